//! Evaluation: validation loss, and strict caption accuracy for data with
//! class labels.
//!
//! Caption accuracy generates greedily from the prompt (the template's text
//! before `{caption}`, e.g. `<image>Output:`), for several images at once,
//! until `<|endofchunk|>` or `max_new_tokens`, and judges each caption with
//! a [`ClassMatcher`].
//!
//! While every gate of the model is exactly 0 (a new connector, as in the
//! evaluation before the first training step), each cross-attention block
//! adds tanh(0) · (its output) = 0, so the output depends on the text alone.
//! [`run_evaluation`] then measures the loss of each distinct text once and
//! generates one caption for all images, which gives the report of the full
//! evaluation in a fraction of the time.

use std::collections::HashMap;
use std::time::Instant;

use flamingo_model::flamingo::{Flamingo, GenerationConfig, LossOutput, TokenizedText};
use serde::{Deserialize, Serialize};

use crate::accuracy::{ClassMatcher, Verdict};
use crate::batch::{assemble, unfit_reason, visual_tokens};
use crate::data::{DataError, Sample};
use crate::error::{Result, TrainError};
use crate::extract::FeatureExtractor;
use crate::features::FeatureCache;
use crate::progress;
use crate::stop::StopFlag;
use crate::text::TextEncoder;

/// The result of one evaluation, written as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Optimizer steps the evaluated connector was trained for.
    pub step: u64,
    /// Samples read.
    pub samples: usize,
    /// Mean cross-entropy over every caption token of the samples.
    pub validation_loss: Option<f32>,
    /// Caption tokens the loss covers.
    pub validation_tokens: usize,
    pub accuracy: Option<AccuracyReport>,
    /// Whether every sample was read (false after a stop request).
    pub complete: bool,
    pub seconds: f64,
}

/// Caption accuracy over the labelled samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    /// The text generation starts from.
    pub prompt: String,
    pub max_new_tokens: usize,
    /// Predictions that name the right class and no other.
    pub correct: u64,
    pub total: u64,
    /// correct / total.
    pub accuracy: f64,
    /// Predictions naming exactly one, wrong class.
    pub wrong_class: u64,
    /// Predictions naming no class.
    pub no_class: u64,
    /// Predictions naming more than one class.
    pub several_classes: u64,
    pub per_class: Vec<ClassAccuracy>,
    /// Column names of `confusion`: every class, then "no class" and "several classes".
    pub confusion_columns: Vec<String>,
    /// Counts by true class (rows) and outcome (columns).
    pub confusion: Vec<Vec<u64>>,
    /// Samples left out: no label, or not exactly one image.
    pub not_scored: u64,
    /// The first predictions, for reading.
    pub examples: Vec<Prediction>,
    /// Seconds spent generating captions.
    pub generation_seconds: f64,
}

/// Accuracy on one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    pub label: usize,
    pub class: String,
    pub correct: u64,
    pub total: u64,
}

/// One generated caption and its judgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub label: usize,
    pub class: String,
    pub text: String,
    pub verdict: Verdict,
}

/// The measurements and batch sizes of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub max_samples: Option<usize>,
    /// Measure caption accuracy (when labels and class names exist).
    pub accuracy: bool,
    pub max_new_tokens: usize,
    pub max_examples: usize,
    pub progress_bar: bool,
}

/// The model and the caches an evaluation reads.
pub struct EvalContext<'a> {
    pub model: &'a Flamingo,
    pub cache: &'a mut FeatureCache,
    pub extractor: &'a mut FeatureExtractor,
    pub text: &'a mut TextEncoder,
    pub matcher: Option<&'a ClassMatcher>,
    /// Whether the samples' features are already cached (precomputed data).
    pub precomputed: bool,
}

/// Running totals of caption accuracy.
struct AccuracyTally {
    prompt: String,
    prompt_ids: Vec<u32>,
    correct: u64,
    total: u64,
    wrong: u64,
    none: u64,
    several: u64,
    not_scored: u64,
    confusion: Vec<Vec<u64>>,
    examples: Vec<Prediction>,
    generation_seconds: f64,
}

/// Evaluates the samples `samples` yields (one epoch) in batches. When
/// every gate of the model is exactly 0, the images cannot change the
/// output, so this runs [`run_text_only_evaluation`]. Otherwise it runs
/// [`run_full_evaluation`].
pub fn run_evaluation(
    ctx: &mut EvalContext,
    samples: &mut dyn Iterator<Item = Result<Sample, DataError>>,
    expected: Option<usize>,
    options: &EvalOptions,
    step: u64,
    stop: &StopFlag,
) -> Result<EvalReport> {
    if gates_closed(ctx.model)? {
        tracing::info!("every gate is 0, so the images cannot change the output and each distinct text is evaluated once");
        return run_text_only_evaluation(ctx, samples, expected, options, step, stop);
    }
    run_full_evaluation(ctx, samples, expected, options, step, stop)
}

/// Evaluates every sample: the loss of each, and a caption generated from
/// each sample's own image.
pub fn run_full_evaluation(
    ctx: &mut EvalContext,
    samples: &mut dyn Iterator<Item = Result<Sample, DataError>>,
    expected: Option<usize>,
    options: &EvalOptions,
    step: u64,
    stop: &StopFlag,
) -> Result<EvalReport> {
    evaluate_chunks(ctx, samples, expected, options, step, stop, &mut Measure::EverySample)
}

/// Evaluates a model whose gates are all exactly 0, so that its output
/// depends on the text alone. The loss of each distinct text is measured
/// once and counted for every sample with that text. One caption, generated
/// from the prompt and any sample's image, is judged against every label.
/// The report equals that of [`run_full_evaluation`], up to float rounding
/// in the loss and apart from the times.
///
/// Fails when a gate is open, because the images would then matter.
pub fn run_text_only_evaluation(
    ctx: &mut EvalContext,
    samples: &mut dyn Iterator<Item = Result<Sample, DataError>>,
    expected: Option<usize>,
    options: &EvalOptions,
    step: u64,
    stop: &StopFlag,
) -> Result<EvalReport> {
    if !gates_closed(ctx.model)? {
        return Err(TrainError::Config(
            "the text-only evaluation needs every gate at exactly 0, but a gate is open, so the images change the output. Use run_evaluation, which then evaluates every sample".into(),
        ));
    }
    let mut measure = Measure::TextOnly { losses: HashMap::new(), caption: None };
    evaluate_chunks(ctx, samples, expected, options, step, stop, &mut measure)
}

/// Returns whether tanh of every gate of the model is exactly 0, so that
/// no cross-attention block changes the text states.
fn gates_closed(model: &Flamingo) -> Result<bool> {
    Ok(model.gate_values()?.iter().all(|gate| gate.attention == 0.0 && gate.feed_forward == 0.0))
}

/// The measurement of each chunk of samples.
enum Measure {
    /// Run the model on every sample.
    EverySample,
    /// Run it once per distinct text, which needs every gate at 0.
    TextOnly {
        /// The loss of every distinct text that fits a batch.
        losses: HashMap<String, LossOutput>,
        /// The caption generated from the prompt, the same for every image.
        caption: Option<String>,
    },
}

/// Reads `samples` in chunks of `options.batch_size` and measures each
/// chunk as `measure` selects.
fn evaluate_chunks(
    ctx: &mut EvalContext,
    samples: &mut dyn Iterator<Item = Result<Sample, DataError>>,
    expected: Option<usize>,
    options: &EvalOptions,
    step: u64,
    stop: &StopFlag,
    measure: &mut Measure,
) -> Result<EvalReport> {
    let started = Instant::now();
    let limit = options.max_samples.unwrap_or(usize::MAX);
    let total = expected.map(|n| n.min(limit) as u64).unwrap_or(0);
    let bar = progress::bar(total, options.progress_bar && expected.is_some(), progress::EVAL_TEMPLATE);
    bar.set_prefix(format!("eval step {step}"));

    let mut tally = accuracy_tally(ctx, options)?;
    let (mut read, mut loss_sum, mut loss_tokens) = (0usize, 0.0f64, 0usize);
    let mut complete = true;
    // A loader's iterator starts the next epoch after its `None`, so
    // reading stops at the first one.
    let mut exhausted = false;
    while !exhausted {
        if stop.is_set() {
            complete = false;
            break;
        }
        let mut chunk = Vec::with_capacity(options.batch_size);
        while chunk.len() < options.batch_size && read + chunk.len() < limit {
            match samples.next() {
                Some(sample) => chunk.push(sample?),
                None => {
                    exhausted = true;
                    break;
                }
            }
        }
        if chunk.is_empty() {
            break;
        }
        read += chunk.len();

        let (sum, tokens) = match measure {
            Measure::EverySample => {
                if !ctx.precomputed {
                    ctx.extractor.ensure(&chunk, ctx.cache)?;
                }
                let measured = chunk_loss(ctx, &chunk)?;
                if let Some(tally) = tally.as_mut() {
                    score_chunk(ctx, &chunk, tally, options)?;
                }
                measured
            }
            Measure::TextOnly { losses, caption } => {
                let measured = text_only_chunk_loss(ctx, &chunk, losses)?;
                if let Some(tally) = tally.as_mut() {
                    score_chunk_text_only(ctx, &chunk, tally, caption, options)?;
                }
                measured
            }
        };
        loss_sum += sum;
        loss_tokens += tokens;
        ctx.cache.clear_transient();
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let validation_loss = (loss_tokens > 0).then(|| (loss_sum / loss_tokens as f64) as f32);
    let accuracy = tally.map(|tally| finish_tally(tally, ctx.matcher.expect("a tally exists only with class names"), options));
    Ok(EvalReport { step, samples: read, validation_loss, validation_tokens: loss_tokens, accuracy, complete, seconds: started.elapsed().as_secs_f64() })
}

/// Tokenizes the samples of `chunk` and returns those that fit a batch,
/// with their tokens, logging why each other one is left out.
fn fitting_samples<'a>(ctx: &mut EvalContext, chunk: &'a [Sample]) -> Result<(Vec<&'a Sample>, Vec<TokenizedText>)> {
    let limits = ctx.model.batch_limits();
    let mut fitting = Vec::with_capacity(chunk.len());
    let mut tokens = Vec::with_capacity(chunk.len());
    for sample in chunk {
        let encoded = ctx.text.encode(ctx.model, &sample.text)?;
        if let Some(reason) = unfit_reason(&encoded, sample.media.len(), &limits) {
            tracing::debug!("validation sample {} is left out: {reason}", sample.id);
            continue;
        }
        fitting.push(sample);
        tokens.push(encoded);
    }
    Ok((fitting, tokens))
}

/// Summed loss and target tokens of the samples that fit a batch.
fn chunk_loss(ctx: &mut EvalContext, chunk: &[Sample]) -> Result<(f64, usize)> {
    let (fitting, tokens) = fitting_samples(ctx, chunk)?;
    if fitting.is_empty() {
        return Ok((0.0, 0));
    }
    let batch = assemble(ctx.model, ctx.cache, &fitting, tokens)?;
    let output = ctx.model.loss(&batch.text, &batch.visual)?;
    Ok((output.loss as f64 * output.tokens as f64, output.tokens))
}

/// Summed loss and target tokens of the samples that fit a batch, running
/// the model only on texts not in `losses` yet (every gate is 0).
fn text_only_chunk_loss(ctx: &mut EvalContext, chunk: &[Sample], losses: &mut HashMap<String, LossOutput>) -> Result<(f64, usize)> {
    let (fitting, tokens) = fitting_samples(ctx, chunk)?;
    let mut new_samples: Vec<Sample> = Vec::new();
    let mut new_tokens = Vec::new();
    for (&sample, encoded) in fitting.iter().zip(tokens) {
        if !losses.contains_key(&sample.text) && !new_samples.iter().any(|new| new.text == sample.text) {
            new_samples.push(sample.clone());
            new_tokens.push(encoded);
        }
    }

    if !new_samples.is_empty() {
        // Any image gives the same loss, so each new text is measured with its first sample's.
        if !ctx.precomputed {
            ctx.extractor.ensure(&new_samples, ctx.cache)?;
        }
        let refs: Vec<&Sample> = new_samples.iter().collect();
        let batch = assemble(ctx.model, ctx.cache, &refs, new_tokens)?;
        let outputs = ctx.model.loss_per_sample(&batch.text, &batch.visual)?;
        for (sample, output) in new_samples.iter().zip(outputs) {
            losses.insert(sample.text.clone(), output);
        }
    }

    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for sample in fitting {
        let output = losses[&sample.text];
        sum += output.loss as f64 * output.tokens as f64;
        tokens += output.tokens;
    }
    Ok((sum, tokens))
}

fn accuracy_tally(ctx: &EvalContext, options: &EvalOptions) -> Result<Option<AccuracyTally>> {
    let Some(matcher) = ctx.matcher else { return Ok(None) };
    let layout = ctx.text.layout();
    if !options.accuracy {
        return Ok(None);
    }
    if !layout.prompt_has_image() {
        tracing::warn!("caption accuracy is skipped: the prompt template has no <image> before {{caption}}, so there is no prompt to generate from");
        return Ok(None);
    }
    let classes = matcher.names().len();
    Ok(Some(AccuracyTally {
        prompt: layout.prefix.clone(),
        prompt_ids: ctx.model.encode_prompt(&layout.prefix)?,
        correct: 0,
        total: 0,
        wrong: 0,
        none: 0,
        several: 0,
        not_scored: 0,
        confusion: vec![vec![0; classes + 2]; classes],
        examples: Vec::new(),
        generation_seconds: 0.0,
    }))
}

/// Selects the labelled single-image samples of `chunk`, which caption
/// accuracy scores, with their labels, and counts the others as not scored.
fn scored_samples<'s>(chunk: &'s [Sample], classes: usize, tally: &mut AccuracyTally) -> Vec<(&'s Sample, usize)> {
    let scored: Vec<(&Sample, usize)> = chunk
        .iter()
        .filter_map(|sample| match sample.label {
            Some(label) if (label as usize) < classes && sample.media.len() == 1 => Some((sample, label as usize)),
            _ => None,
        })
        .collect();
    tally.not_scored += (chunk.len() - scored.len()) as u64;
    scored
}

/// Generates captions for the labelled single-image samples and judges them.
fn score_chunk(ctx: &mut EvalContext, chunk: &[Sample], tally: &mut AccuracyTally, options: &EvalOptions) -> Result<()> {
    let matcher = ctx.matcher.expect("a tally exists only with class names");
    let scored = scored_samples(chunk, matcher.names().len(), tally);
    if scored.is_empty() {
        return Ok(());
    }

    let started = Instant::now();
    let samples: Vec<&Sample> = scored.iter().map(|(sample, _)| *sample).collect();
    let visual = visual_tokens(ctx.model, ctx.cache, &samples)?;
    let prompts = vec![tally.prompt_ids.clone(); samples.len()];
    let config = GenerationConfig { max_new_tokens: options.max_new_tokens, ..Default::default() };
    let generations = ctx.model.generate(&prompts, Some(&visual), &config)?;
    tally.generation_seconds += started.elapsed().as_secs_f64();

    for ((sample, label), generation) in scored.iter().zip(generations) {
        record_prediction(tally, matcher, sample, *label, generation.text, options);
    }
    Ok(())
}

/// Judges the caption every image gets when every gate is 0, generating it
/// from the first scored sample's image when `caption` is still empty.
fn score_chunk_text_only(
    ctx: &mut EvalContext,
    chunk: &[Sample],
    tally: &mut AccuracyTally,
    caption: &mut Option<String>,
    options: &EvalOptions,
) -> Result<()> {
    let matcher = ctx.matcher.expect("a tally exists only with class names");
    let scored = scored_samples(chunk, matcher.names().len(), tally);
    let Some((first, _)) = scored.first() else {
        return Ok(());
    };

    if caption.is_none() {
        let started = Instant::now();
        if !ctx.precomputed {
            ctx.extractor.ensure(std::slice::from_ref(*first), ctx.cache)?;
        }
        let visual = visual_tokens(ctx.model, ctx.cache, &[*first])?;
        let config = GenerationConfig { max_new_tokens: options.max_new_tokens, ..Default::default() };
        let generation = ctx.model.generate(std::slice::from_ref(&tally.prompt_ids), Some(&visual), &config)?;
        *caption = Some(generation.into_iter().next().expect("one prompt gives one generation").text);
        tally.generation_seconds += started.elapsed().as_secs_f64();
    }
    let caption = caption.as_deref().expect("the caption was just generated");
    for (sample, label) in &scored {
        record_prediction(tally, matcher, sample, *label, caption.to_string(), options);
    }
    Ok(())
}

/// Judges one generated caption and adds it to the tally.
fn record_prediction(tally: &mut AccuracyTally, matcher: &ClassMatcher, sample: &Sample, label: usize, text: String, options: &EvalOptions) {
    let classes = matcher.names().len();
    let verdict = matcher.judge(&text, label);
    tally.total += 1;
    let column = match verdict {
        Verdict::Correct => {
            tally.correct += 1;
            label
        }
        Verdict::Wrong(class) => {
            tally.wrong += 1;
            class
        }
        Verdict::NoClass => {
            tally.none += 1;
            classes
        }
        Verdict::SeveralClasses => {
            tally.several += 1;
            classes + 1
        }
    };
    tally.confusion[label][column] += 1;
    if tally.examples.len() < options.max_examples {
        tally.examples.push(Prediction { id: sample.id.clone(), label, class: matcher.names()[label].clone(), text, verdict });
    }
}

fn finish_tally(tally: AccuracyTally, matcher: &ClassMatcher, options: &EvalOptions) -> AccuracyReport {
    let per_class = matcher
        .names()
        .iter()
        .enumerate()
        .map(|(label, class)| ClassAccuracy {
            label,
            class: class.clone(),
            correct: tally.confusion[label][label],
            total: tally.confusion[label].iter().sum(),
        })
        .collect();
    let mut columns: Vec<String> = matcher.names().to_vec();
    columns.push("no class".into());
    columns.push("several classes".into());
    AccuracyReport {
        prompt: tally.prompt,
        max_new_tokens: options.max_new_tokens,
        correct: tally.correct,
        total: tally.total,
        accuracy: if tally.total > 0 { tally.correct as f64 / tally.total as f64 } else { 0.0 },
        wrong_class: tally.wrong,
        no_class: tally.none,
        several_classes: tally.several,
        per_class,
        confusion_columns: columns,
        confusion: tally.confusion,
        not_scored: tally.not_scored,
        examples: tally.examples,
        generation_seconds: tally.generation_seconds,
    }
}
