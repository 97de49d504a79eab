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
            eprintln!("error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole context chain on one line, "cannot connect …: refused", without repeating
/// a cause: many errors (redis, reqwest, …) already include their source's text in their
/// own, so `{:#}` would print "Connection refused (os error 111): Connection refused (os
/// error 111)". A message equal to or contained in the one before it is left out.
fn error_line(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || parts.last().is_some_and(|previous| previous.contains(text)) {
            continue;
        }
        parts.push(text.to_owned());
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug)]
    struct Wrapping(String, Option<std::io::Error>);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_ref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = refused().to_string();
        let error = anyhow::Error::new(Wrapping(text.clone(), Some(refused())))
            .context("cannot connect to Redis (REDIS_URL)");
        assert_eq!(
            error_line(&error),
            format!("cannot connect to Redis (REDIS_URL): {text}")
        );
        let prefixed = format!("IO error: {text}");
        let error = anyhow::Error::new(Wrapping(prefixed, Some(refused()))).context("outer");
        assert_eq!(error_line(&error), format!("outer: IO error: {text}"));
        let distinct = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_line(&distinct), "outer: middle: inner");
    }
}
