//! The one error type of `peft-core`. Every variant that concerns a file carries the file, the
//! key and what was expected versus found, so a user can fix the input without a debugger.

use std::path::PathBuf;

/// Result alias used throughout peft-core and the crates built on it.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// Errors raised by peft-core and by method and model crates that build on it.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// Reading or writing a file failed.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error (part of the message, not a separate cause, so that error
        /// chains print it once).
        error: std::io::Error,
    },
    /// A JSON document could not be parsed at all.
    #[error("{source_name}: invalid JSON: {message}")]
    Json {
        /// Where the JSON came from (a path, or a description such as `<in-memory config>`).
        source_name: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A configuration value has the wrong type or an invalid value.
    #[error("{source_name}: `{key}`: expected {expected}, found {found}")]
    ConfigValue {
        /// Where the configuration came from.
        source_name: String,
        /// The offending key.
        key: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A required configuration key is absent.
    #[error("{source_name}: missing required key `{key}` ({expected})")]
    MissingKey {
        /// Where the configuration came from.
        source_name: String,
        /// The missing key.
        key: String,
        /// What the key should hold.
        expected: String,
    },
    /// A configuration asks for something this library does not implement (yet).
    #[error("{source_name}: `{key}` = {value} is not supported: {reason}")]
    Unsupported {
        /// Where the configuration came from.
        source_name: String,
        /// The key that asks for the unsupported feature.
        key: String,
        /// Its value, as JSON.
        value: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// `peft_type` names no registered method.
    #[error("{source_name}: unknown peft_type `{found}`; registered methods: {registered}")]
    UnknownMethod {
        /// Where the configuration came from.
        source_name: String,
        /// The peft_type found.
        found: String,
        /// The registered peft types, comma separated.
        registered: String,
    },
    /// Two crates registered the same peft_type.
    #[error("peft_type `{peft_type}` is registered twice (by {first} and {second})")]
    DuplicateMethod {
        /// The duplicated peft_type.
        peft_type: String,
        /// Crate or description of the first registration.
        first: String,
        /// Crate or description of the second registration.
        second: String,
    },
    /// The target-module configuration matched nothing.
    #[error("{message}; module names in the model include: {examples}")]
    NoTargetMatch {
        /// Which patterns were tried and why nothing was selected.
        message: String,
        /// A few module names that do exist.
        examples: String,
    },
    /// A module selected by the target configuration cannot be adapted by this method.
    #[error("target module `{path}` is {kind}; {method} can adapt only {supported}")]
    UnsupportedModule {
        /// The module path.
        path: String,
        /// What kind of module it is.
        kind: String,
        /// The method's peft_type.
        method: String,
        /// What the method can adapt.
        supported: String,
    },
    /// A tensor in a checkpoint has the wrong shape.
    #[error("{}: tensor `{key}`: expected shape {expected:?}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the adapter needs is absent from the checkpoint.
    #[error("{}: missing tensor `{key}` (expected shape {expected:?}); the file holds {available} tensors", path.display())]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The missing key.
        key: String,
        /// The shape the adapter expects.
        expected: Vec<usize>,
        /// How many tensors the file does hold.
        available: usize,
    },
    /// A checkpoint file is truncated or not in the expected format.
    #[error("{}: not a valid {format} file: {reason}", path.display())]
    BadCheckpoint {
        /// The file.
        path: PathBuf,
        /// The expected format.
        format: String,
        /// What is wrong.
        reason: String,
    },
    /// An adapter name was not found.
    #[error("no adapter named `{name}`; adapters: [{available}]")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The adapters that exist.
        available: String,
    },
    /// An adapter with this name already exists.
    #[error("an adapter named `{0}` already exists")]
    AdapterExists(String),
    /// Input tensors have the wrong shape or dtype.
    #[error("{context}: expected {expected}, found {found}")]
    BadInput {
        /// What was being done.
        context: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A record of a data file cannot be used (bad JSON, missing field, empty text, too long).
    #[error("{}:{line}: {reason}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line (JSONL) or record (CSV, counting the header as line 1).
        line: usize,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// An operation that is not valid in the model's current state.
    #[error("{0}")]
    InvalidState(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl PeftError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PeftError::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Builds a [`PeftError::ConfigValue`].
    pub fn config_value(
        source_name: &str,
        key: &str,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        PeftError::ConfigValue {
            source_name: source_name.to_string(),
            key: key.to_string(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Builds a [`PeftError::BadInput`].
    pub fn bad_input(
        context: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        PeftError::BadInput {
            context: context.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }
}
