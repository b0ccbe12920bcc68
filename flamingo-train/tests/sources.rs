//! Training from WebDataset shards (features encoded on first use) and
//! from interleaved documents with several images per sample.

mod train_support;

use std::io::Cursor as IoCursor;
use std::path::{Path, PathBuf};

use flamingo_train::{train, DataFormat, DataSource, StopFlag, Trainer};
use train_support::*;

/// PNG bytes of a generated image.
fn png(colour: [u8; 3], seed: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    colour_image(colour, seed).write_to(&mut IoCursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// Writes `shards` tar files of `per_shard` image-caption samples each.
fn write_shards(dir: &Path, shards: usize, per_shard: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut paths = Vec::new();
    for shard in 0..shards {
        let path = dir.join(format!("shard-{shard}.tar"));
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for i in 0..per_shard {
            let index = shard * per_shard + i;
            let (name, colour) = COLOURS[index % COLOURS.len()];
            let files = [(format!("{index:05}.png"), png(colour, index as u64)), (format!("{index:05}.txt"), format!("a {name} square").into_bytes())];
            for (file, data) in files {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                builder.append_data(&mut header, file, data.as_slice()).unwrap();
            }
        }
        builder.finish().unwrap();
        paths.push(path.display().to_string());
    }
    paths
}

#[test]
fn webdataset_shards_train_and_resume() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let shards = write_shards(&dir.path().join("shards"), 3, 6);
    let configure = |name: &str| {
        let mut source = DataSource::new(DataFormat::Webdataset);
        source.shards = shards.clone();
        source.shuffle_buffer = Some(4);
        let mut config = tiny_config(&dir.path().join(name), Path::new("unused.jsonl"));
        config.data.train = source;
        config.data.validation_fraction = 0.34;
        config.steps = 10;
        config.batch_size = 3;
        config
    };

    let whole = train(configure("whole"), &StopFlag::new()).unwrap();
    assert_eq!(whole.last_step, 10);
    assert_eq!(whole.features.frames_encoded, 18, "12 training and 6 validation images, each encoded once");
    let evaluation = whole.evaluation.as_ref().unwrap();
    assert_eq!(evaluation.samples, 6, "one shard of six samples is held out");

    let split = configure("split");
    let first = Trainer::new(split.clone()).unwrap().run(&StopFlag::new(), &mut StopAt(4)).unwrap();
    assert_eq!(first.last_step, 4);
    let mut resumed = split;
    resumed.resume = true;
    train(resumed, &StopFlag::new()).unwrap();
    assert_eq!(losses(&dir.path().join("split/metrics.jsonl")), losses(&dir.path().join("whole/metrics.jsonl")));
}

/// Writes documents with one or two images each; returns the manifest.
fn write_documents(dir: &Path, count: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = String::new();
    for i in 0..count {
        let (first, first_colour) = COLOURS[i % COLOURS.len()];
        let (second, second_colour) = COLOURS[(i + 1) % COLOURS.len()];
        colour_image(first_colour, i as u64).save(dir.join(format!("{i}a.png"))).unwrap();
        if i % 2 == 0 {
            colour_image(second_colour, 100 + i as u64).save(dir.join(format!("{i}b.png"))).unwrap();
            lines.push_str(&format!(
                "{{\"images\": [\"{i}a.png\", \"{i}b.png\"], \"text\": \"<image>a {first} square<|endofchunk|><image>a {second} square<|endofchunk|>\"}}\n"
            ));
        } else {
            lines.push_str(&format!("{{\"images\": [\"{i}a.png\"], \"text\": \"<image>a {first} square<|endofchunk|>\"}}\n"));
        }
    }
    let manifest = dir.join("documents.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    manifest
}

#[test]
fn interleaved_documents_train() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_documents(&dir.path().join("data"), 10);
    let mut config = tiny_config(&dir.path().join("run"), &manifest);
    config.data.train = DataSource::with_path(DataFormat::Interleaved, &manifest);
    config.model.max_images = 2;
    config.steps = 12;
    let summary = train(config.clone(), &StopFlag::new()).unwrap();
    assert_eq!(summary.last_step, 12);
    assert_eq!(summary.features.frames_encoded, 15, "five documents have two images, five have one");
    assert_eq!(summary.samples_left_out, 0);
    let losses = losses(&dir.path().join("run/metrics.jsonl"));
    assert!(losses.iter().all(|(_, loss)| loss.is_finite()));

    // With one image per sample allowed, the two-image documents are left out and counted.
    config.model.max_images = 1;
    config.output_dir = dir.path().join("one-image");
    config.features.dir = Some(dir.path().join("one-image/feature-cache"));
    let summary = train(config, &StopFlag::new()).unwrap();
    assert!(summary.samples_left_out > 0);
    assert_eq!(summary.last_step, 12);
}
