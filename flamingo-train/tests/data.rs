//! Tests of every dataset source against small files written to a temporary folder.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flamingo_train::data::{
    train_validation_split, CsvPairsConfig, Cursor, DataError, FashionMnistSplit, IdxConfig,
    IdxDataset, ImageTextDataset, IndexedDataset, InterleavedConfig, InterleavedDataset,
    JsonlPairsConfig, Loader, LoaderConfig, Media, PromptTemplate, Sample, SampleStream, SkipLog,
    SkipReason, VideoConfig, VideoDataset, WebDataset, WebDatasetConfig,
};
use image::codecs::gif::GifEncoder;
use image::{Frame, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Writing test files

fn image_bytes(image: impl Into<image::DynamicImage>, format: ImageFormat) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    image.into().write_to(&mut buffer, format).unwrap();
    buffer.into_inner()
}

/// Encodes a 4x3 PNG of one colour, because tests identify images by colour.
fn png(color: [u8; 3]) -> Vec<u8> {
    image_bytes(RgbImage::from_pixel(4, 3, Rgb(color)), ImageFormat::Png)
}

fn jpeg(color: [u8; 3]) -> Vec<u8> {
    image_bytes(RgbImage::from_pixel(8, 8, Rgb(color)), ImageFormat::Jpeg)
}

fn write(path: impl AsRef<Path>, bytes: &[u8]) {
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

fn write_lines(path: impl AsRef<Path>, lines: &[String]) {
    write(path, (lines.join("\n") + "\n").as_bytes());
}

/// Returns the colour of a sample's n-th image (or first frame) at pixel (0, 0).
fn color(sample: &Sample, media: usize) -> [u8; 3] {
    sample.media[media].frames()[0].get_pixel(0, 0).0
}

/// Writes and opens a JSONL pairs dataset of `count` PNGs whose red channel is the index.
fn numbered_pairs(dir: &Path, count: usize) -> ImageTextDataset {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            write(dir.join(format!("images/{i}.png")), &png([i as u8, 0, 0]));
            format!(r#"{{"image": "images/{i}.png", "text": "caption {i}"}}"#)
        })
        .collect();
    write_lines(dir.join("pairs.jsonl"), &lines);
    ImageTextDataset::from_jsonl(dir.join("pairs.jsonl"), &JsonlPairsConfig::default()).unwrap()
}

fn red_channels(samples: &[Sample]) -> Vec<u8> {
    samples.iter().map(|sample| color(sample, 0)[0]).collect()
}

fn write_tar(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(File::create(path).unwrap());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
}

/// Writes shards `shard-000.tar` ... with `per_shard` PNG+txt samples each
/// and returns their brace pattern. Sample n has red channel n and caption
/// "sample n".
fn numbered_shards(dir: &Path, shards: usize, per_shard: usize) -> String {
    for shard in 0..shards {
        let mut entries = Vec::new();
        for i in 0..per_shard {
            let n = shard * per_shard + i;
            entries.push((format!("s/{n:06}.png"), png([n as u8, 1, 2])));
            entries.push((
                format!("s/{n:06}.txt"),
                format!("sample {n}\n").into_bytes(),
            ));
        }
        write_tar(&dir.join(format!("shard-{shard:03}.tar")), &entries);
    }
    format!("{}/shard-{{000..{:03}}}.tar", dir.display(), shards - 1)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn idx_images(count: usize, rows: usize, columns: usize) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, 3];
    for size in [count, rows, columns] {
        bytes.extend((size as u32).to_be_bytes());
    }
    for i in 0..count {
        bytes.extend((0..rows * columns).map(|p| (i * 10 + p) as u8));
    }
    bytes
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, 1];
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend(labels);
    bytes
}

fn loader(dataset: impl IndexedDataset + 'static, shuffle: bool, seed: u64) -> Loader {
    Loader::new(Arc::new(dataset), LoaderConfig { shuffle, seed }).unwrap()
}

fn epoch(stream: &mut impl SampleStream) -> Vec<Sample> {
    stream.by_ref().map(Result::unwrap).collect()
}

// ---------------------------------------------------------------------------
// JSONL and CSV image-caption pairs

#[test]
fn jsonl_pairs_decode() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("img/red.png"), &png([255, 0, 0]));
    write(dir.path().join("img/photo.jpg"), &jpeg([0, 0, 255]));
    let grey = image::GrayImage::from_pixel(5, 2, Luma([77]));
    write(
        dir.path().join("img/grey.png"),
        &image_bytes(grey, ImageFormat::Png),
    );
    let rgba = RgbaImage::from_pixel(2, 2, Rgba([10, 20, 30, 40]));
    write(
        dir.path().join("img/alpha.png"),
        &image_bytes(rgba, ImageFormat::Png),
    );
    let absolute = dir.path().join("img/red.png");
    write_lines(
        dir.path().join("data/pairs.jsonl"),
        &[
            // The first line starts with a byte order mark.
            "\u{feff}".to_string() + r#"{"image": "../img/red.png", "text": "  A red square. "}"#,
            r#"{"image": "../img/photo.jpg", "text": "Blue.", "extra": 1}"#.to_string(),
            r#"{"image": "../img/grey.png", "text": "Grey."}"#.to_string(),
            r#"{"image": "../img/alpha.png", "text": "Translucent."}"#.to_string(),
            String::new(),
            format!(
                r#"{{"image": {:?}, "text": "Absolute."}}"#,
                absolute.display().to_string()
            ),
        ],
    );

    let dataset = ImageTextDataset::from_jsonl(
        dir.path().join("data/pairs.jsonl"),
        &JsonlPairsConfig::default(),
    )
    .unwrap();
    assert_eq!(dataset.len(), 5);
    assert_eq!(dataset.skips().total(), 0);

    let red = dataset.get(0).unwrap();
    assert_eq!(red.text, "<image>Output:A red square.<|endofchunk|>");
    assert_eq!(red.media.len(), 1);
    assert!(matches!(red.media[0], Media::Image(_)));
    assert_eq!(red.media[0].frames()[0].dimensions(), (4, 3));
    assert_eq!(color(&red, 0), [255, 0, 0]);
    assert!(red.id.ends_with("pairs.jsonl:1"), "{}", red.id);
    assert_eq!(red.label, None);

    let blue = dataset.get(1).unwrap();
    let [r, g, b] = color(&blue, 0);
    assert!(r < 20, "JPEG colour {:?}", [r, g, b]);
    assert!(g < 20, "JPEG colour {:?}", [r, g, b]);
    assert!(b > 235, "JPEG colour {:?}", [r, g, b]);

    assert_eq!(color(&dataset.get(2).unwrap(), 0), [77, 77, 77]);
    assert_eq!(color(&dataset.get(3).unwrap(), 0), [10, 20, 30]);
    assert_eq!(
        dataset.get(4).unwrap().text,
        "<image>Output:Absolute.<|endofchunk|>"
    );
}

#[test]
fn jsonl_pairs_skip_bad_lines() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("ok.png"), &png([1, 2, 3]));
    write(dir.path().join("broken.png"), b"this is not a PNG");
    write_lines(
        dir.path().join("pairs.jsonl"),
        &[
            r#"{"image": "ok.png", "text": "fine"}"#.to_string(),
            r#"{"image": "ok.png", "text": "unterminated"#.to_string(),
            r#"{"image": "ok.png", "text": "   "}"#.to_string(),
            r#"{"image": "gone.png", "text": "missing"}"#.to_string(),
            r#"{"image": "ok.png"}"#.to_string(),
            r#"{"image": 5, "text": "number"}"#.to_string(),
            r#"["not", "an", "object"]"#.to_string(),
            r#"{"image": "ok.png", "text": "two <image> markers"}"#.to_string(),
            r#"{"image": "broken.png", "text": "undecodable"}"#.to_string(),
        ],
    );

    let dataset =
        ImageTextDataset::from_jsonl(dir.path().join("pairs.jsonl"), &JsonlPairsConfig::default())
            .unwrap();
    let skips = dataset.skips().clone();
    assert_eq!(dataset.len(), 2);
    assert_eq!(skips.count(SkipReason::InvalidRecord), 4);
    assert_eq!(skips.count(SkipReason::EmptyCaption), 1);
    assert_eq!(skips.count(SkipReason::MissingFile), 1);
    assert_eq!(skips.count(SkipReason::MarkerMismatch), 1);
    assert_eq!(skips.count(SkipReason::UndecodableImage), 0);

    let mut loader = loader(dataset, false, 0);
    let samples = epoch(&mut loader);
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].text, "<image>Output:fine<|endofchunk|>");
    assert_eq!(skips.count(SkipReason::UndecodableImage), 1);
    assert_eq!(skips.total(), 8);

    let first = skips.first().unwrap();
    assert!(first.id.ends_with("pairs.jsonl:2"), "{first}");
    assert!(
        skips.summary().starts_with("8 skipped ("),
        "{}",
        skips.summary()
    );
}

#[test]
fn jsonl_custom_keys_and_prompt() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("a.png"), &png([9, 9, 9]));
    write_lines(
        dir.path().join("p.jsonl"),
        &[r#"{"url": "a.png", "caption": "A grey square."}"#.to_string()],
    );

    let config = JsonlPairsConfig {
        image_key: "url".to_string(),
        text_key: "caption".to_string(),
        prompt: PromptTemplate::new("Caption: <image> {caption}").unwrap(),
    };
    let dataset = ImageTextDataset::from_jsonl(dir.path().join("p.jsonl"), &config).unwrap();
    assert_eq!(
        dataset.get(0).unwrap().text,
        "Caption: <image> A grey square."
    );
}

#[test]
fn csv_pairs_quoted_fields() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("pictures/a.png"), &png([10, 0, 0]));
    write(dir.path().join("pictures/b.png"), &png([20, 0, 0]));
    write(dir.path().join("pictures/c.png"), &png([30, 0, 0]));
    let csv = "id,file,description\n\
               1,a.png,\"A cat, sitting.\"\n\
               2,b.png,\"She said \"\"hi\"\".\"\n\
               3,c.png,\"Two\nlines\"\n\
               4,a.png\n\
               5,missing.png,Nothing.\n\
               6,b.png,\n";
    write(dir.path().join("meta/captions.csv"), csv.as_bytes());

    let config = CsvPairsConfig {
        image_column: "file".to_string(),
        caption_column: "description".to_string(),
        image_dir: Some(dir.path().join("pictures")),
        ..CsvPairsConfig::default()
    };
    let dataset =
        ImageTextDataset::from_csv(dir.path().join("meta/captions.csv"), &config).unwrap();
    assert_eq!(dataset.len(), 3);
    assert_eq!(dataset.caption(0), "A cat, sitting.");
    assert_eq!(dataset.caption(1), "She said \"hi\".");
    assert_eq!(dataset.caption(2), "Two\nlines");
    assert_eq!(color(&dataset.get(1).unwrap(), 0), [20, 0, 0]);

    let skips = dataset.skips();
    assert_eq!(skips.count(SkipReason::InvalidRecord), 1);
    assert_eq!(skips.count(SkipReason::MissingFile), 1);
    assert_eq!(skips.count(SkipReason::EmptyCaption), 1);
    let first = skips.first().unwrap();
    assert!(first.id.ends_with("captions.csv:6"), "{first}");
}

#[test]
fn csv_default_folder_and_tabs() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("x.png"), &png([5, 6, 7]));
    write(
        dir.path().join("list.tsv"),
        "\u{feff}image\tcaption\nx.png\tA small image.\n".as_bytes(),
    );

    let config = CsvPairsConfig {
        delimiter: b'\t',
        ..CsvPairsConfig::default()
    };
    let dataset = ImageTextDataset::from_csv(dir.path().join("list.tsv"), &config).unwrap();
    assert_eq!(
        dataset.get(0).unwrap().text,
        "<image>Output:A small image.<|endofchunk|>"
    );
}

#[test]
fn csv_missing_column_is_fatal() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("c.csv"), b"path,text\na.png,hello\n");

    let error = ImageTextDataset::from_csv(dir.path().join("c.csv"), &CsvPairsConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, DataError::MissingColumn { ref column, .. } if column == "image"));
    let message = error.to_string();
    assert!(message.contains("c.csv"), "{message}");
    assert!(message.contains("path, text"), "{message}");
}

// ---------------------------------------------------------------------------
// Fatal cases shared by the manifest formats

#[test]
fn manifest_without_samples_is_fatal() {
    let dir = TempDir::new().unwrap();
    write_lines(
        dir.path().join("pairs.jsonl"),
        &[
            r#"{"image": "nowhere/a.png", "text": "a"}"#.to_string(),
            r#"{"image": "nowhere/b.png", "text": "b"}"#.to_string(),
        ],
    );

    let error =
        ImageTextDataset::from_jsonl(dir.path().join("pairs.jsonl"), &JsonlPairsConfig::default())
            .err()
            .unwrap();
    assert!(matches!(error, DataError::NoSamples { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("pairs.jsonl"), "{message}");
    assert!(message.contains("missing file: 2"), "{message}");
    assert!(message.contains("nowhere/a.png"), "{message}");
}

#[test]
fn manifest_missing_file_is_fatal() {
    let dir = TempDir::new().unwrap();
    let error = ImageTextDataset::from_jsonl(
        dir.path().join("absent.jsonl"),
        &JsonlPairsConfig::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(error, DataError::Io { .. }), "{error}");
    assert!(error.to_string().contains("absent.jsonl"));
}

#[test]
fn loader_all_bad_is_fatal() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("a.png"), b"garbage");
    write(dir.path().join("b.png"), b"more garbage");
    write_lines(
        dir.path().join("pairs.jsonl"),
        &[
            r#"{"image": "a.png", "text": "a"}"#.to_string(),
            r#"{"image": "b.png", "text": "b"}"#.to_string(),
        ],
    );
    let dataset =
        ImageTextDataset::from_jsonl(dir.path().join("pairs.jsonl"), &JsonlPairsConfig::default())
            .unwrap();

    let mut batches = loader(dataset, true, 1);
    let error = batches.next_batch(4).err().unwrap();
    assert!(matches!(error, DataError::NoSamples { .. }), "{error}");
    assert!(
        error.to_string().contains("undecodable image: 2"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// Loader order, cursor and split

#[test]
fn loader_sequential_epochs() {
    let dir = TempDir::new().unwrap();
    let mut loader = loader(numbered_pairs(dir.path(), 5), false, 0);

    assert_eq!(red_channels(&epoch(&mut loader)), vec![0, 1, 2, 3, 4]);
    assert_eq!(loader.epoch(), 1);
    assert_eq!(red_channels(&epoch(&mut loader)), vec![0, 1, 2, 3, 4]);
}

#[test]
fn loader_shuffle_is_seeded() {
    let dir = TempDir::new().unwrap();
    let dataset: Arc<dyn IndexedDataset> = Arc::new(numbered_pairs(dir.path(), 30));
    let config = LoaderConfig {
        shuffle: true,
        seed: 5,
    };

    let mut first = Loader::new(dataset.clone(), config).unwrap();
    let mut second = Loader::new(dataset.clone(), config).unwrap();
    let epoch0 = red_channels(&epoch(&mut first));
    let epoch1 = red_channels(&epoch(&mut first));
    assert_eq!(epoch0, red_channels(&epoch(&mut second)));
    assert_ne!(epoch0, epoch1, "each epoch should have its own order");
    assert_ne!(epoch0, (0..30).collect::<Vec<u8>>());

    let mut sorted = epoch1.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..30).collect::<Vec<u8>>());

    let mut other_seed = Loader::new(
        dataset,
        LoaderConfig {
            shuffle: true,
            seed: 6,
        },
    )
    .unwrap();
    assert_ne!(epoch0, red_channels(&epoch(&mut other_seed)));
}

#[test]
fn loader_batches_cross_epochs() {
    let dir = TempDir::new().unwrap();
    let mut loader = loader(numbered_pairs(dir.path(), 5), false, 0);

    let batch = loader.next_batch(3).unwrap();
    assert_eq!(red_channels(&batch), vec![0, 1, 2]);
    let batch = loader.next_batch(4).unwrap();
    assert_eq!(red_channels(&batch), vec![3, 4, 0, 1]);
    assert_eq!(loader.epoch(), 1);
    assert!(loader.next_batch(0).unwrap().is_empty());
}

#[test]
fn loader_cursor_restores_exactly() {
    let dir = TempDir::new().unwrap();
    let dataset: Arc<dyn IndexedDataset> = Arc::new(numbered_pairs(dir.path(), 13));
    let config = LoaderConfig {
        shuffle: true,
        seed: 42,
    };

    let mut original = Loader::new(dataset.clone(), config).unwrap();
    original.next_batch(20).unwrap();
    let saved = serde_json::to_string(&original.cursor()).unwrap();
    let expected = red_channels(&original.next_batch(30).unwrap());

    let cursor: Cursor = serde_json::from_str(&saved).unwrap();
    assert_eq!((cursor.epoch, cursor.position), (1, 7));
    let mut resumed = Loader::new(
        dataset,
        LoaderConfig {
            shuffle: false,
            seed: 0,
        },
    )
    .unwrap();
    resumed.restore(&cursor).unwrap();
    assert_eq!(resumed.cursor(), cursor);
    assert_eq!(red_channels(&resumed.next_batch(30).unwrap()), expected);
}

#[test]
fn loader_cursor_rejects_other_data() {
    let dir = TempDir::new().unwrap();
    let mut loader = loader(numbered_pairs(dir.path(), 4), true, 0);
    let cursor = Cursor {
        epoch: 0,
        position: 1,
        seed: 0,
        shuffle: true,
        order_len: 5,
    };

    let error = loader.restore(&cursor).err().unwrap();
    assert!(matches!(error, DataError::Cursor(_)), "{error}");
    assert!(error.to_string().contains("5 records"), "{error}");
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let dir = TempDir::new().unwrap();
    let dataset: Arc<dyn IndexedDataset> = Arc::new(numbered_pairs(dir.path(), 20));

    let (train, validation) = train_validation_split(dataset.clone(), 3, 0.25).unwrap();
    assert_eq!((train.len(), validation.len()), (15, 5));
    assert!(train
        .indices()
        .iter()
        .all(|index| !validation.indices().contains(index)));

    let (again, _) = train_validation_split(dataset.clone(), 3, 0.25).unwrap();
    assert_eq!(again.indices(), train.indices());
    let (other, _) = train_validation_split(dataset, 4, 0.25).unwrap();
    assert_ne!(other.indices(), train.indices());

    let mut validation_loader = loader(validation.clone(), false, 0);
    let reds = red_channels(&epoch(&mut validation_loader));
    let expected: Vec<u8> = validation
        .indices()
        .iter()
        .map(|&index| index as u8)
        .collect();
    assert_eq!(reds, expected);
}

// ---------------------------------------------------------------------------
// WebDataset shards

#[test]
fn webdataset_reads_groups_in_order() {
    let dir = TempDir::new().unwrap();
    let shard = dir.path().join("mixed.tar");
    write_tar(
        &shard,
        &[
            ("a/001.jpg".to_string(), jpeg([200, 0, 0])),
            ("a/001.txt".to_string(), b"A red photo.\n".to_vec()),
            ("a/002.png".to_string(), png([0, 200, 0])),
            (
                "a/002.json".to_string(),
                br#"{"caption": "A green square.", "id": 2}"#.to_vec(),
            ),
            ("a/002.cls".to_string(), b"7".to_vec()),
            (
                "a/003.webp".to_string(),
                image_bytes(
                    RgbImage::from_pixel(2, 2, Rgb([0, 0, 200])),
                    ImageFormat::WebP,
                ),
            ),
            (
                "a/003.json".to_string(),
                br#"{"text": "A blue square."}"#.to_vec(),
            ),
            ("a/004.txt".to_string(), b"No image.".to_vec()),
            ("a/005.png".to_string(), png([1, 1, 1])),
            ("a/006.png".to_string(), b"not a png".to_vec()),
            ("a/006.txt".to_string(), b"Broken image.".to_vec()),
            ("a/007.png".to_string(), png([1, 1, 1])),
            ("a/007.json".to_string(), br#"{"url": "x"}"#.to_vec()),
        ],
    );

    let dataset =
        WebDataset::open(&[shard.to_str().unwrap()], WebDatasetConfig::default()).unwrap();
    let mut stream = dataset
        .stream(LoaderConfig {
            shuffle: false,
            seed: 0,
        })
        .unwrap();
    let samples = epoch(&mut stream);

    let texts: Vec<&str> = samples.iter().map(|sample| sample.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "<image>Output:A red photo.<|endofchunk|>",
            "<image>Output:A green square.<|endofchunk|>",
            "<image>Output:A blue square.<|endofchunk|>",
        ]
    );
    assert_eq!(color(&samples[1], 0), [0, 200, 0]);
    assert!(
        samples[1].id.ends_with("mixed.tar:a/002"),
        "{}",
        samples[1].id
    );

    let skips = dataset.skips();
    assert_eq!(skips.count(SkipReason::IncompleteGroup), 2);
    assert_eq!(skips.count(SkipReason::UndecodableImage), 1);
    assert_eq!(skips.count(SkipReason::InvalidRecord), 1);
}

#[test]
fn webdataset_expands_shard_ranges() {
    let dir = TempDir::new().unwrap();
    let pattern = numbered_shards(dir.path(), 3, 4);

    let dataset = WebDataset::open(&[pattern], WebDatasetConfig::default()).unwrap();
    assert_eq!(dataset.shards().len(), 3);
    let mut stream = dataset
        .stream(LoaderConfig {
            shuffle: false,
            seed: 0,
        })
        .unwrap();
    assert_eq!(
        red_channels(&epoch(&mut stream)),
        (0..12).collect::<Vec<u8>>()
    );
    assert_eq!(stream.epoch(), 1);
}

#[test]
fn webdataset_shuffle_is_seeded() {
    let dir = TempDir::new().unwrap();
    let pattern = numbered_shards(dir.path(), 4, 10);
    let config = WebDatasetConfig {
        shuffle_buffer: 8,
        ..WebDatasetConfig::default()
    };
    let dataset = WebDataset::open(&[pattern], config).unwrap();
    let shuffled = LoaderConfig {
        shuffle: true,
        seed: 11,
    };

    let mut first = dataset.stream(shuffled).unwrap();
    let epoch0 = red_channels(&epoch(&mut first));
    let epoch1 = red_channels(&epoch(&mut first));
    let mut second = dataset.stream(shuffled).unwrap();
    assert_eq!(epoch0, red_channels(&epoch(&mut second)));
    assert_ne!(epoch0, epoch1);
    assert_ne!(epoch0, (0..40).collect::<Vec<u8>>());

    let mut sorted = epoch0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..40).collect::<Vec<u8>>());
}

#[test]
fn webdataset_cursor_restores_exactly() {
    let dir = TempDir::new().unwrap();
    let pattern = numbered_shards(dir.path(), 3, 7);
    let config = WebDatasetConfig {
        shuffle_buffer: 5,
        ..WebDatasetConfig::default()
    };
    let dataset = WebDataset::open(&[pattern], config).unwrap();
    let shuffled = LoaderConfig {
        shuffle: true,
        seed: 3,
    };

    let mut original = dataset.stream(shuffled).unwrap();
    original.next_batch(30).unwrap();
    let cursor = original.cursor();
    assert_eq!((cursor.epoch, cursor.position, cursor.order_len), (1, 9, 3));
    let expected = red_channels(&original.next_batch(25).unwrap());

    let mut resumed = dataset
        .stream(LoaderConfig {
            shuffle: false,
            seed: 0,
        })
        .unwrap();
    resumed.restore(&cursor).unwrap();
    assert_eq!(resumed.cursor(), cursor);
    assert_eq!(red_channels(&resumed.next_batch(25).unwrap()), expected);
}

#[test]
fn webdataset_gzip_shard() {
    let dir = TempDir::new().unwrap();
    numbered_shards(dir.path(), 1, 3);
    let tar = fs::read(dir.path().join("shard-000.tar")).unwrap();
    write(dir.path().join("shard.tar.gz"), &gzip(&tar));

    let dataset = WebDataset::open(
        &[dir.path().join("shard.tar.gz").to_str().unwrap()],
        WebDatasetConfig::default(),
    )
    .unwrap();
    let mut stream = dataset
        .stream(LoaderConfig {
            shuffle: false,
            seed: 0,
        })
        .unwrap();
    assert_eq!(red_channels(&epoch(&mut stream)), vec![0, 1, 2]);
}

#[test]
fn webdataset_truncated_shard_is_skipped() {
    let dir = TempDir::new().unwrap();
    numbered_shards(dir.path(), 2, 6);
    let path = dir.path().join("shard-000.tar");
    let tar = fs::read(&path).unwrap();
    fs::write(&path, &tar[..tar.len() / 2 + 100]).unwrap();

    let pattern = format!("{}/shard-{{000,001}}.tar", dir.path().display());
    let dataset = WebDataset::open(&[pattern], WebDatasetConfig::default()).unwrap();
    let mut stream = dataset
        .stream(LoaderConfig {
            shuffle: false,
            seed: 0,
        })
        .unwrap();
    let reds = red_channels(&epoch(&mut stream));

    assert!(reds.len() < 12, "{reds:?}");
    assert!(reds.len() >= 8, "{reds:?}");
    assert_eq!(reds[reds.len() - 6..], [6, 7, 8, 9, 10, 11]);
    assert_eq!(dataset.skips().count(SkipReason::TruncatedShard), 1);
    assert!(dataset
        .skips()
        .first()
        .unwrap()
        .id
        .ends_with("shard-000.tar"));
}

#[test]
fn webdataset_bad_shards_are_fatal() {
    let dir = TempDir::new().unwrap();
    numbered_shards(dir.path(), 1, 2);
    write(dir.path().join("junk.tar"), &[b'x'; 2048]);

    let missing = format!("{}/shard-{{000..001}}.tar", dir.path().display());
    let error = WebDataset::open(&[missing], WebDatasetConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, DataError::Shard { .. }), "{error}");
    assert!(error.to_string().contains("shard-001.tar"), "{error}");

    let junk = dir.path().join("junk.tar");
    let error = WebDataset::open(&[junk.to_str().unwrap()], WebDatasetConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, DataError::Shard { .. }), "{error}");
    assert!(error.to_string().contains("junk.tar"), "{error}");

    let error = WebDataset::open(&["shard-{000..".to_string()], WebDatasetConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, DataError::Pattern { .. }), "{error}");
}

#[test]
fn webdataset_without_samples_is_fatal() {
    let dir = TempDir::new().unwrap();
    let shard = dir.path().join("captions-only.tar");
    write_tar(&shard, &[("k/1.txt".to_string(), b"text".to_vec())]);

    let dataset =
        WebDataset::open(&[shard.to_str().unwrap()], WebDatasetConfig::default()).unwrap();
    let mut stream = dataset.stream(LoaderConfig::default()).unwrap();
    let error = stream.next_batch(2).err().unwrap();
    assert!(matches!(error, DataError::NoSamples { .. }), "{error}");
    assert!(
        error.to_string().contains("incomplete WebDataset group: 1"),
        "{error}"
    );
}

#[test]
fn webdataset_split_shards() {
    let dir = TempDir::new().unwrap();
    let pattern = numbered_shards(dir.path(), 10, 1);
    let dataset = WebDataset::open(&[pattern], WebDatasetConfig::default()).unwrap();

    let (train, validation) = dataset.split_shards(1, 0.2).unwrap();
    assert_eq!((train.shards().len(), validation.shards().len()), (8, 2));
    assert!(train
        .shards()
        .iter()
        .all(|shard| !validation.shards().contains(shard)));
    let (again, _) = dataset.split_shards(1, 0.2).unwrap();
    assert_eq!(again.shards(), train.shards());

    let single = WebDataset::open(
        &[train.shards()[0].to_str().unwrap()],
        WebDatasetConfig::default(),
    )
    .unwrap();
    assert!(single.split_shards(1, 0.2).is_err());
}

// ---------------------------------------------------------------------------
// Interleaved documents

#[test]
fn interleaved_documents() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("a.png"), &png([1, 0, 0]));
    write(dir.path().join("b.png"), &png([2, 0, 0]));
    write(dir.path().join("bad.png"), b"not an image");
    let text = "<image>A cat.<|endofchunk|> Then <image>a dog.<|endofchunk|>";
    write_lines(
        dir.path().join("docs.jsonl"),
        &[
            format!(r#"{{"images": ["a.png", "b.png"], "text": "{text}"}}"#),
            r#"{"images": ["a.png"], "text": "<image> one <image> two"}"#.to_string(),
            r#"{"images": [], "text": "no images"}"#.to_string(),
            r#"{"images": "a.png", "text": "<image>"}"#.to_string(),
            r#"{"images": ["a.png", "missing.png"], "text": "<image><image>"}"#.to_string(),
            r#"{"images": ["b.png", "bad.png"], "text": "<image>x<image>y"}"#.to_string(),
        ],
    );

    let dataset = InterleavedDataset::from_jsonl(
        dir.path().join("docs.jsonl"),
        &InterleavedConfig::default(),
    )
    .unwrap();
    assert_eq!(dataset.len(), 2);
    let skips = dataset.skips().clone();
    assert_eq!(skips.count(SkipReason::MarkerMismatch), 1);
    assert_eq!(skips.count(SkipReason::NoMedia), 1);
    assert_eq!(skips.count(SkipReason::InvalidRecord), 1);
    assert_eq!(skips.count(SkipReason::MissingFile), 1);

    let document = dataset.get(0).unwrap();
    assert_eq!(document.text, text);
    assert_eq!(document.media.len(), 2);
    assert_eq!((color(&document, 0)[0], color(&document, 1)[0]), (1, 2));

    let broken = dataset.get(1).err().unwrap();
    assert_eq!(broken.reason, SkipReason::UndecodableImage);
    assert!(broken.detail.contains("bad.png"), "{broken}");
}

// ---------------------------------------------------------------------------
// IDX files

#[test]
fn idx_plain_and_gzip() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("images.idx"), &idx_images(3, 2, 3));
    write(
        dir.path().join("labels.idx.gz"),
        &gzip(&idx_labels(&[9, 0, 7])),
    );

    let config = IdxConfig::fashion_mnist();
    let dataset = IdxDataset::open(
        dir.path().join("images.idx"),
        dir.path().join("labels.idx.gz"),
        config,
    )
    .unwrap();
    assert_eq!(dataset.len(), 3);
    assert_eq!(dataset.image_size(), (3, 2));
    assert_eq!(dataset.labels(), &[9, 0, 7]);

    let boot = dataset.get(0).unwrap();
    assert_eq!(
        boot.text,
        "<image>Output:A photo of an ankle boot.<|endofchunk|>"
    );
    assert_eq!(boot.label, Some(9));
    let image = &boot.media[0].frames()[0];
    assert_eq!(image.dimensions(), (3, 2));
    assert_eq!(image.get_pixel(2, 1).0, [5, 5, 5]);

    let shirt = dataset.get(1).unwrap();
    assert_eq!(
        shirt.text,
        "<image>Output:A photo of a t-shirt.<|endofchunk|>"
    );
    assert_eq!(shirt.media[0].frames()[0].get_pixel(0, 0).0, [10, 10, 10]);
    assert_eq!(dataset.caption(2), "A photo of a sneaker.");
}

#[test]
fn idx_custom_classes() {
    let dir = TempDir::new().unwrap();
    write(dir.path().join("i"), &idx_images(2, 1, 1));
    write(dir.path().join("l"), &idx_labels(&[1, 0]));

    let mut config = IdxConfig::new(["zero", "one"]);
    config.class_template =
        flamingo_train::data::ClassTemplate::new("digit {label} ({class})").unwrap();
    let dataset = IdxDataset::open(dir.path().join("i"), dir.path().join("l"), config).unwrap();
    assert_eq!(dataset.caption(0), "digit 1 (one)");
}

#[test]
fn idx_fatal_errors() {
    let dir = TempDir::new().unwrap();
    let images = dir.path().join("images");
    let labels = dir.path().join("labels");
    let open = || {
        IdxDataset::open(&images, &labels, IdxConfig::fashion_mnist())
            .err()
            .unwrap()
    };

    write(&images, &idx_labels(&[1, 2]));
    write(&labels, &idx_labels(&[1, 2]));
    let error = open();
    assert!(
        matches!(
            error,
            DataError::IdxMagic {
                found: 0x801,
                expected: 0x803,
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("0x00000801"), "{message}");
    assert!(message.contains("0x00000803"), "{message}");
    assert!(message.contains("images"), "{message}");

    write(&images, &idx_images(3, 2, 2));
    let error = open();
    assert!(
        matches!(
            error,
            DataError::CountMismatch {
                images: 3,
                labels: 2,
                ..
            }
        ),
        "{error}"
    );

    let mut truncated = idx_images(2, 2, 2);
    truncated.pop();
    write(&images, &truncated);
    let error = open();
    assert!(error.to_string().contains("truncated"), "{error}");

    write(&images, &idx_images(2, 2, 2));
    write(&labels, &idx_labels(&[1, 10]));
    let error = open();
    assert!(
        matches!(
            error,
            DataError::LabelOutOfRange {
                index: 1,
                label: 10,
                classes: 10,
                ..
            }
        ),
        "{error}"
    );

    write(&labels, &gzip(&idx_labels(&[1, 2]))[..20]);
    let error = open();
    assert!(error.to_string().contains("gzip"), "{error}");
}

#[test]
fn idx_fashion_mnist_layout() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path().join("t10k-images-idx3-ubyte.gz"),
        &gzip(&idx_images(4, 28, 28)),
    );
    write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        &idx_labels(&[0, 1, 2, 3]),
    );

    let dataset = IdxDataset::fashion_mnist(
        dir.path(),
        FashionMnistSplit::Test,
        IdxConfig::fashion_mnist(),
    )
    .unwrap();
    assert_eq!(dataset.len(), 4);
    assert_eq!(dataset.caption(3), "A photo of a dress.");

    let error = IdxDataset::fashion_mnist(
        dir.path(),
        FashionMnistSplit::Train,
        IdxConfig::fashion_mnist(),
    )
    .err()
    .unwrap();
    assert!(matches!(error, DataError::NotFound { .. }), "{error}");
    assert!(
        error.to_string().contains("train-images-idx3-ubyte"),
        "{error}"
    );
}

/// Needs the real Fashion-MNIST files; skipped with a message when they are absent.
#[test]
fn idx_real_fashion_mnist() {
    let Some(dir) = flamingo_train::data::default_fashion_mnist_dir() else {
        eprintln!("skipped idx_real_fashion_mnist: neither FLAMINGO_CACHE nor HOME is set");
        return;
    };
    let train =
        match IdxDataset::fashion_mnist(&dir, FashionMnistSplit::Train, IdxConfig::fashion_mnist())
        {
            Ok(train) => train,
            Err(DataError::NotFound { path, .. }) => {
                eprintln!(
                    "skipped idx_real_fashion_mnist: {} not found",
                    path.display()
                );
                return;
            }
            Err(error) => panic!("{error}"),
        };

    assert_eq!(train.len(), 60_000);
    assert_eq!(train.image_size(), (28, 28));
    for class in 0..10u8 {
        let count = train
            .labels()
            .iter()
            .filter(|&&label| label == class)
            .count();
        assert_eq!(count, 6_000, "class {class}");
    }
    let first = train.get(0).unwrap();
    assert_eq!(first.label, Some(9));
    assert_eq!(
        first.text,
        "<image>Output:A photo of an ankle boot.<|endofchunk|>"
    );

    let test = IdxDataset::fashion_mnist(&dir, FashionMnistSplit::Test, IdxConfig::fashion_mnist())
        .unwrap();
    assert_eq!(test.len(), 10_000);
    let mut loader = loader(test, true, 0);
    assert_eq!(loader.next_batch(256).unwrap().len(), 256);
}

// ---------------------------------------------------------------------------
// Video clips

fn write_frames(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let path = dir.join(name);
            write(&path, &png([(i * 10) as u8, 0, 0]));
            path
        })
        .collect()
}

fn frame_reds(sample: &Sample) -> Vec<u8> {
    match &sample.media[..] {
        [Media::Video(frames)] => frames
            .iter()
            .map(|frame| frame.get_pixel(0, 0).0[0])
            .collect(),
        other => panic!("expected one video, found {} media", other.len()),
    }
}

fn write_gif(path: &Path, greys: &[u8]) {
    let mut encoder = GifEncoder::new(File::create(path).unwrap());
    let frames = greys
        .iter()
        .map(|&grey| Frame::new(RgbaImage::from_pixel(4, 4, Rgba([grey, grey, grey, 255]))));
    encoder.encode_frames(frames).unwrap();
}

#[test]
fn video_frame_list_repeats_short_clips() {
    let dir = TempDir::new().unwrap();
    write_frames(&dir.path().join("clip"), &["0.png", "1.png", "2.png"]);
    write_lines(
        dir.path().join("videos.jsonl"),
        &[
            r#"{"video": ["clip/0.png", "clip/1.png", "clip/2.png"], "text": "A clip."}"#
                .to_string(),
        ],
    );

    let config = VideoConfig {
        frames: 8,
        ..VideoConfig::default()
    };
    let dataset = VideoDataset::from_jsonl(dir.path().join("videos.jsonl"), &config).unwrap();
    let sample = dataset.get(0).unwrap();
    assert_eq!(frame_reds(&sample), vec![0, 0, 0, 10, 10, 20, 20, 20]);
    assert_eq!(sample.text, "<image>Output:A clip.<|endofchunk|>");
}

#[test]
fn video_folder_natural_order() {
    let dir = TempDir::new().unwrap();
    let names: Vec<String> = (1..=10).map(|i| format!("frame_{i}.png")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    write_frames(&dir.path().join("clip"), &names);
    write(dir.path().join("clip/notes.txt"), b"not a frame");
    fs::create_dir_all(dir.path().join("empty")).unwrap();
    write_lines(
        dir.path().join("videos.jsonl"),
        &[
            r#"{"video": "clip", "text": "Ten frames."}"#.to_string(),
            r#"{"video": "empty", "text": "No frames."}"#.to_string(),
        ],
    );

    let config = VideoConfig {
        frames: 5,
        ..VideoConfig::default()
    };
    let dataset = VideoDataset::from_jsonl(dir.path().join("videos.jsonl"), &config).unwrap();
    // Frames are written with red 0, 10, ..., 90 in natural order; indices 1, 3, 5, 7, 9.
    assert_eq!(
        frame_reds(&dataset.get(0).unwrap()),
        vec![10, 30, 50, 70, 90]
    );

    let empty = dataset.get(1).err().unwrap();
    assert_eq!(empty.reason, SkipReason::NoMedia);
}

#[test]
fn video_animated_gif() {
    let dir = TempDir::new().unwrap();
    write_gif(&dir.path().join("clip.gif"), &[0, 60, 120, 180, 240]);
    write(dir.path().join("movie.mp4"), b"not supported");
    write_lines(
        dir.path().join("videos.jsonl"),
        &[
            r#"{"video": "clip.gif", "text": "A fade."}"#.to_string(),
            r#"{"video": "movie.mp4", "text": "Unsupported."}"#.to_string(),
            r#"{"video": "absent.gif", "text": "Missing."}"#.to_string(),
            r#"{"video": [], "text": "Empty."}"#.to_string(),
        ],
    );

    let config = VideoConfig {
        frames: 3,
        ..VideoConfig::default()
    };
    let dataset = VideoDataset::from_jsonl(dir.path().join("videos.jsonl"), &config).unwrap();
    assert_eq!(dataset.len(), 1);
    assert_eq!(dataset.skips().count(SkipReason::InvalidRecord), 1);
    assert_eq!(dataset.skips().count(SkipReason::MissingFile), 1);
    assert_eq!(dataset.skips().count(SkipReason::NoMedia), 1);

    // Five frames sampled to three: indices 0, 2, 4. GIF palettes may shift
    // a grey level slightly.
    let reds = frame_reds(&dataset.get(0).unwrap());
    for (found, expected) in reds.iter().zip([0u8, 120, 240]) {
        assert!(found.abs_diff(expected) <= 8, "frames {reds:?}");
    }
}

#[test]
fn video_zero_frames_is_rejected() {
    let dir = TempDir::new().unwrap();
    write_lines(
        dir.path().join("v.jsonl"),
        &[r#"{"video": [], "text": "x"}"#.to_string()],
    );
    let config = VideoConfig {
        frames: 0,
        ..VideoConfig::default()
    };
    let error = VideoDataset::from_jsonl(dir.path().join("v.jsonl"), &config)
        .err()
        .unwrap();
    assert!(matches!(error, DataError::Config(_)), "{error}");
}

// ---------------------------------------------------------------------------
// Skip reporting

/// Collects everything a tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn skip_warnings_are_rate_limited() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();

    let log = SkipLog::new();
    tracing::subscriber::with_default(subscriber, || {
        for line in 1..=120 {
            let bad = flamingo_train::data::BadSample::new(
                SkipReason::EmptyCaption,
                format!("f.jsonl:{line}"),
                "empty",
            );
            log.record(&bad);
        }
    });

    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = output
        .lines()
        .filter(|line| line.contains("WARN"))
        .collect();
    assert_eq!(warnings.len(), 7, "{output}");
    assert!(warnings[0].contains("f.jsonl:1"), "{output}");
    assert!(
        warnings[5].contains("10 samples skipped so far"),
        "{output}"
    );
    assert!(
        warnings[6].contains("100 samples skipped so far"),
        "{output}"
    );
    assert_eq!(log.count(SkipReason::EmptyCaption), 120);
}
