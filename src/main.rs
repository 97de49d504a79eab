//! `thena-vitally`: one binary, one subcommand per role. This file only parses the
//! command line and the configuration and starts a role; each role lives in its crate.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "cannot connect …: refused".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
