//! The `peft` command line: list methods, inspect adapters, compute logits (the parity
//! interface), combine adapters, merge adapters into a model folder, and run the offline demo.
//! Results go to stdout, diagnostics to stderr; errors exit non-zero with one line.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Reference every enabled method crate so its registration is linked in.
#[cfg(feature = "c3a")]
use peft::c3a as _;
#[cfg(feature = "fourierft")]
use peft::fourierft as _;
#[cfg(feature = "hra")]
use peft::hra as _;
#[cfg(feature = "ia3")]
use peft::ia3 as _;
#[cfg(feature = "loha")]
use peft::loha as _;
#[cfg(feature = "lokr")]
use peft::lokr as _;
#[cfg(feature = "lora")]
use peft::lora as _;
#[cfg(feature = "miss")]
use peft::miss as _;
#[cfg(feature = "oft")]
use peft::oft as _;
#[cfg(feature = "ptuning")]
use peft::p_tuning as _;
#[cfg(feature = "prefix")]
use peft::prefix_tuning as _;
#[cfg(feature = "prompt")]
use peft::prompt_tuning as _;
#[cfg(feature = "vera")]
use peft::vera as _;

/// Parameter-efficient fine-tuning for candle, checkpoint-compatible with Hugging Face peft.
#[derive(Debug, Parser)]
#[command(name = "peft", version, about)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Where models run: cpu, cuda, cuda:N, metal or metal:N (CUDA and Metal need a build
    /// with `--features cuda` / `metal`).
    #[arg(long, global = true, env = "PEFT_DEVICE", default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the methods linked into this build.
    Methods,
    /// Show the devices this build can use, and which kernels run on the CPU.
    Devices,
    /// Print the trainable-parameter line from a model config and an adapter config alone.
    Count(commands::count::CountArgs),
    /// Show an adapter's config and tensors (and, with --model, its parameter line).
    Inspect(commands::inspect::InspectArgs),
    /// Run a model (with adapters) on input ids and write its logits.
    Logits(commands::logits::LogitsArgs),
    /// Continue a prompt (greedy or sampled, streamed) with a model and adapters.
    Generate(commands::generate::GenerateArgs),
    /// Fine-tune an adapter on a data file (JSONL or CSV).
    Train(Box<commands::train::TrainArgs>),
    /// Loss and perplexity of a model (and adapters) on a data file.
    Eval(commands::eval::EvalArgs),
    /// Combine adapters into a new one (peft's add_weighted_adapter: svd, cat, ties, dare, ...).
    Combine(commands::combine::CombineArgs),
    /// Merge an adapter into its base model and write a model folder.
    Merge(commands::merge::MergeArgs),
    /// Write a quantized (int8 / NF4 / FP4) copy of a model in the bitsandbytes checkpoint format.
    Quantize(commands::quantize::QuantizeArgs),
    /// Fine-tune a small model offline: train, save, reload, merge, and check each step.
    Demo(commands::demo::DemoArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// candle asks `num_cpus` for the thread count on every matmul unless RAYON_NUM_THREADS is
/// set, and `num_cpus` reads cgroup files each time; set it once here.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> ExitCode {
    pin_thread_count();
    peft::alloc::keep_freed_memory();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let opened = match &cli.command {
        // `peft devices` reports on the asked-for device itself, failures included.
        Command::Devices => Ok(()),
        Command::Demo(_) => {
            if cli.device != "cpu" {
                eprintln!(
                    "note: `peft demo` runs its embedded model on the CPU (--device {} ignored)",
                    cli.device
                );
            }
            Ok(())
        }
        _ => commands::set_device(&cli.device),
    };
    let result = opened.and_then(|()| run(cli.command, &cli.device));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, device: &str) -> anyhow::Result<()> {
    match command {
        Command::Devices => commands::methods::devices(device),
        Command::Methods => commands::methods::run(),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Count(args) => commands::count::run(args),
        Command::Logits(args) => commands::logits::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Combine(args) => commands::combine::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Demo(args) => commands::demo::run(args),
    }
}
