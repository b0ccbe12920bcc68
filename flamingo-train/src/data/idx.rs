//! IDX files (the MNIST format) as a captioned classification dataset.
//!
//! An IDX file is a 4-byte magic number `00 00 TT NN` (TT the element type,
//! 0x08 for unsigned bytes; NN the number of dimensions), NN big-endian u32
//! dimension sizes, then the elements in row-major order. Images are
//! `[count, rows, columns]` (magic 0x00000803) and labels `[count]` (magic
//! 0x00000801). Files may be gzip-compressed, as Fashion-MNIST ships; this is
//! detected from the content, not the file name.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use image::RgbImage;

use super::error::{BadSample, DataError};
use super::sample::{Media, Sample};
use super::skip::SkipLog;
use super::template::{ClassTemplate, PromptTemplate};
use super::IndexedDataset;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The class names of Fashion-MNIST as its authors publish them, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The Fashion-MNIST class names as they read in a caption, by label.
pub const FASHION_MNIST_CAPTION_NAMES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// The class names and templates that turn IDX labels into text.
#[derive(Clone, Debug)]
pub struct IdxConfig {
    /// The name of each class, indexed by label.
    pub class_names: Vec<String>,
    /// The template that turns a class name into a caption.
    pub class_template: ClassTemplate,
    /// The template that turns the caption into training text.
    pub prompt: PromptTemplate,
}

impl IdxConfig {
    /// Creates a configuration with the given class names and the default templates.
    pub fn new(class_names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        IdxConfig {
            class_names: class_names.into_iter().map(Into::into).collect(),
            class_template: ClassTemplate::default(),
            prompt: PromptTemplate::default(),
        }
    }

    /// Creates the configuration of Fashion-MNIST: its caption names and the
    /// default templates, so label 9
    /// reads `<image>Output:A photo of an ankle boot.<|endofchunk|>`.
    pub fn fashion_mnist() -> Self {
        Self::new(FASHION_MNIST_CAPTION_NAMES)
    }
}

/// The two parts of Fashion-MNIST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FashionMnistSplit {
    /// 60,000 training images, files `train-*`.
    Train,
    /// 10,000 test images, files `t10k-*`.
    Test,
}

impl FashionMnistSplit {
    fn file_prefix(self) -> &'static str {
        match self {
            FashionMnistSplit::Train => "train",
            FashionMnistSplit::Test => "t10k",
        }
    }
}

/// Returns the folder where Fashion-MNIST is expected by default: the
/// `fashion-mnist` folder of the asset cache (`$FLAMINGO_CACHE`, else
/// `$XDG_CACHE_HOME/flamingo`, else `$HOME/.cache/flamingo`). `None` if none
/// of those variables is set.
pub fn default_fashion_mnist_dir() -> Option<PathBuf> {
    Some(crate::config::default_cache_root()?.join("fashion-mnist"))
}

/// Greyscale images with class labels from a pair of IDX files.
///
/// Both files are read into memory once when opened (47 MB for the 60,000
/// Fashion-MNIST training images). Each image becomes an RGB8 image only
/// when its sample is requested. A sample's text is its class caption
/// rendered through the prompt template, and its `label` is the class.
pub struct IdxDataset {
    name: String,
    pixels: Vec<u8>,
    rows: usize,
    columns: usize,
    labels: Vec<u8>,
    config: IdxConfig,
    skips: Arc<SkipLog>,
}

impl IdxDataset {
    /// Reads an image file and its label file.
    ///
    /// Fails on a wrong magic number, a truncated file, differing image and
    /// label counts, a label without a class name, or an empty dataset.
    pub fn open(
        images: impl AsRef<Path>,
        labels: impl AsRef<Path>,
        config: IdxConfig,
    ) -> Result<Self, DataError> {
        let (images, labels) = (images.as_ref(), labels.as_ref());
        if config.class_names.is_empty() {
            return Err(DataError::Config(
                "the IDX class-name list is empty".to_string(),
            ));
        }

        let image_array = read_idx(images, IMAGES_MAGIC, "images")?;
        let label_array = read_idx(labels, LABELS_MAGIC, "labels")?;
        let (count, rows, columns) = (
            image_array.dims[0],
            image_array.dims[1],
            image_array.dims[2],
        );
        if rows == 0 || columns == 0 {
            return Err(DataError::format(
                images,
                format!("the images are {rows}x{columns} pixels"),
            ));
        }
        if label_array.dims[0] != count {
            return Err(DataError::CountMismatch {
                images_path: images.to_path_buf(),
                images: count,
                labels_path: labels.to_path_buf(),
                labels: label_array.dims[0],
            });
        }
        if count == 0 {
            return Err(DataError::NoSamples {
                dataset: images.display().to_string(),
                detail: "the IDX file holds 0 images".to_string(),
            });
        }
        check_labels(labels, &label_array.data, config.class_names.len())?;

        Ok(IdxDataset {
            name: images.display().to_string(),
            pixels: image_array.data,
            rows,
            columns,
            labels: label_array.data,
            config,
            skips: Arc::new(SkipLog::new()),
        })
    }

    /// Opens one split of Fashion-MNIST from `dir`, which contains the files
    /// `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, gzip-compressed
    /// (`.gz`) or not.
    pub fn fashion_mnist(
        dir: impl AsRef<Path>,
        split: FashionMnistSplit,
        config: IdxConfig,
    ) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        let prefix = split.file_prefix();
        let images = find_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        Self::open(images, labels, config)
    }

    /// Returns the label of every image, in file order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Returns the class names, indexed by label.
    pub fn class_names(&self) -> &[String] {
        &self.config.class_names
    }

    /// Returns the image width and height in pixels.
    pub fn image_size(&self) -> (u32, u32) {
        (self.columns as u32, self.rows as u32)
    }

    /// Renders the caption of image `index`, without the prompt template.
    pub fn caption(&self, index: usize) -> String {
        let label = self.labels[index];
        let class = &self.config.class_names[label as usize];
        self.config.class_template.render(class, label.into())
    }
}

impl IndexedDataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        let size = self.rows * self.columns;
        let grey = &self.pixels[index * size..(index + 1) * size];
        let rgb: Vec<u8> = grey.iter().flat_map(|&value| [value; 3]).collect();
        let image = RgbImage::from_raw(self.columns as u32, self.rows as u32, rgb)
            .expect("the buffer has rows * columns RGB pixels");

        Ok(Sample {
            media: vec![Media::Image(image)],
            text: self.config.prompt.render(&self.caption(index)),
            label: Some(self.labels[index].into()),
            id: format!("{}[{index}]", self.name),
        })
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The dimensions and elements of one IDX file of unsigned bytes.
struct IdxArray {
    dims: Vec<usize>,
    data: Vec<u8>,
}

/// Reads an IDX file, checking its magic number and its length.
fn read_idx(path: &Path, expected_magic: u32, role: &'static str) -> Result<IdxArray, DataError> {
    let bytes = read_maybe_gzip(path)?;
    if bytes.len() < 4 {
        return Err(DataError::format(
            path,
            format!(
                "the file has {} bytes, too few for an IDX header",
                bytes.len()
            ),
        ));
    }

    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(DataError::IdxMagic {
            path: path.to_path_buf(),
            found: magic,
            expected: expected_magic,
            role,
        });
    }

    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(DataError::format(
            path,
            "the file ends inside the IDX header",
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|size| u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize)
        .collect();

    let data_len = dims
        .iter()
        .try_fold(1usize, |product, &size| product.checked_mul(size))
        .ok_or_else(|| DataError::format(path, format!("the IDX dimensions {dims:?} overflow")))?;
    let found = bytes.len() - header_len;
    if found < data_len {
        return Err(DataError::format(
            path,
            format!("the file is truncated: dimensions {dims:?} need {data_len} bytes of data, found {found}"),
        ));
    }

    // Reuse the buffer rather than copy 47 MB of Fashion-MNIST pixels.
    let mut data = bytes;
    data.truncate(header_len + data_len);
    data.drain(..header_len);
    Ok(IdxArray { dims, data })
}

/// Reads a whole file, decompressing it if it starts with the gzip magic bytes.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|error| DataError::io(path, error))?;
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }

    let mut decompressed = Vec::new();
    MultiGzDecoder::new(bytes.as_slice())
        .read_to_end(&mut decompressed)
        .map_err(|error| DataError::format(path, format!("invalid gzip data: {error}")))?;
    Ok(decompressed)
}

fn check_labels(path: &Path, labels: &[u8], classes: usize) -> Result<(), DataError> {
    match labels.iter().position(|&label| label as usize >= classes) {
        Some(index) => Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: labels[index],
            classes,
        }),
        None => Ok(()),
    }
}

/// Finds `dir/name` or `dir/name.gz`.
fn find_idx_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(name);
    let gzip = dir.join(format!("{name}.gz"));
    if plain.is_file() {
        return Ok(plain);
    }
    if gzip.is_file() {
        return Ok(gzip);
    }

    Err(DataError::NotFound {
        path: gzip,
        hint: format!(
            "neither {name} nor {name}.gz is in {}. Debian's dataset-fashion-mnist package has them: \
             `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR` \
             puts them in DIR/usr/share/datasets/fashion-mnist/",
            dir.display()
        ),
    })
}
