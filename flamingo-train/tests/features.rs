//! The feature cache: the disk store across reopenings and interruptions,
//! and its reuse by a later training run.

mod train_support;

use flamingo_model::flamingo::BackboneIdentity;
use flamingo_train::features::{FeatureCache, FeatureIdentity};
use flamingo_train::{train, CacheMode, StopFlag};
use half::f16;
use train_support::*;

const TOKENS: usize = 3;
const DIM: usize = 4;

fn identity() -> FeatureIdentity {
    let encoder = BackboneIdentity { path: "encoder.safetensors".into(), sha256: "ab".repeat(32) };
    FeatureIdentity::new(encoder, serde_json::json!({ "final_layer_norm": false }), TOKENS, DIM)
}

/// `frames` rows of distinct values starting at `start`.
fn rows(frames: usize, start: f32) -> Vec<f16> {
    (0..frames * TOKENS * DIM).map(|i| f16::from_f32(start + i as f32 * 0.25)).collect()
}

#[test]
fn disk_cache_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
        cache.insert("a.jsonl:1#0".into(), 11, &rows(1, 0.0)).unwrap();
        cache.insert("a.jsonl:2#0".into(), 12, &rows(3, 100.0)).unwrap();
        cache.flush().unwrap();
    }

    let mut cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
    assert_eq!(cache.len(), 2);
    let first = cache.lookup("a.jsonl:1#0", Some(11)).unwrap();
    assert_eq!(cache.rows(first), rows(1, 0.0).as_slice());
    let second = cache.lookup("a.jsonl:2#0", None).unwrap();
    assert_eq!(second.frames, 3);
    assert_eq!(cache.rows(second), rows(3, 100.0).as_slice());
    assert!(cache.lookup("a.jsonl:1#0", Some(99)).is_none(), "other pixels must not be served the old features");

    // New entries go after the old rows, and growing the file keeps the old ones.
    for i in 0..2000 {
        cache.insert(format!("b#{i}"), i, &rows(1, i as f32)).unwrap();
    }
    assert_eq!(cache.rows(cache.lookup("a.jsonl:2#0", None).unwrap()), rows(3, 100.0).as_slice());
    assert_eq!(cache.rows(cache.lookup("b#1999", None).unwrap()), rows(1, 1999.0).as_slice());
}

#[test]
fn torn_index_line_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join(identity().folder_name());
    {
        let mut cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
        cache.insert("x#0".into(), 1, &rows(1, 5.0)).unwrap();
        cache.flush().unwrap();
    }
    let index = folder.join("index.jsonl");
    let mut text = std::fs::read_to_string(&index).unwrap();
    text.push_str("{\"key\":\"y#0\",\"row\":1,\"fra");
    std::fs::write(&index, text).unwrap();

    {
        let mut cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
        assert_eq!(cache.len(), 1, "the torn line is not an entry");
        cache.insert("z#0".into(), 3, &rows(1, 9.0)).unwrap();
        cache.flush().unwrap();
    }
    let cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
    assert_eq!(cache.len(), 2, "a line appended after the torn one must read back");
    assert_eq!(cache.rows(cache.lookup("z#0", Some(3)).unwrap()), rows(1, 9.0).as_slice());
}

#[test]
fn unflushed_entries_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
    cache.insert("x#0".into(), 1, &rows(1, 5.0)).unwrap();
    // A crash skips the flush that drop would do.
    std::mem::forget(cache);
    let cache = FeatureCache::open_disk(dir.path(), &identity()).unwrap();
    assert!(cache.lookup("x#0", None).is_none());
}

#[test]
fn cache_of_other_encoder_is_separate() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = identity();
    other.encoder.sha256 = "cd".repeat(32);
    assert_ne!(other.folder_name(), identity().folder_name());
    let mut moved = identity();
    moved.encoder.path = "elsewhere/encoder.safetensors".into();
    assert_eq!(moved.folder_name(), identity().folder_name(), "a moved encoder keeps its cache");
    FeatureCache::open_disk(dir.path(), &identity()).unwrap();
    FeatureCache::open_disk(dir.path(), &other).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn second_run_reuses_disk_features() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 10);
    let features = dir.path().join("features");
    let configure = |name: &str| {
        let mut config = tiny_config(&dir.path().join(name), &manifest);
        config.steps = 3;
        config.features.cache = CacheMode::Disk;
        config.features.dir = Some(features.clone());
        config
    };

    let first = train(configure("first"), &StopFlag::new()).unwrap();
    assert_eq!(first.features.frames_encoded, 10);
    assert_eq!(first.features.cache_hits, 0);

    let second = train(configure("second"), &StopFlag::new()).unwrap();
    assert_eq!(second.features.frames_encoded, 0, "every image is in the disk cache");
    assert_eq!(second.features.cache_hits, 10);

    // A changed image is encoded again.
    colour_image([10, 10, 10], 1234).save(dir.path().join("data/images/003.png")).unwrap();
    let third = train(configure("third"), &StopFlag::new()).unwrap();
    assert_eq!((third.features.frames_encoded, third.features.cache_hits), (1, 9));
}

#[test]
fn run_without_cache_encodes_every_batch() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 10);
    let mut config = tiny_config(&dir.path().join("run"), &manifest);
    config.steps = 3;
    config.batch_size = 2;
    config.data.validation_fraction = 0.0;
    config.features.cache = CacheMode::Off;
    let summary = train(config, &StopFlag::new()).unwrap();
    assert_eq!(summary.last_step, 3);
    assert_eq!(summary.features.frames_encoded, 6, "3 steps × 2 images, none kept");
}
