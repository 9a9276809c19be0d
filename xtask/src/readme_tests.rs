//! The README's `cargo xtask ...` commands must be commands this xtask takes.

use clap::Parser;
use vmr_tests::readme::{expand, inline_spans, readme, shell_lines};

use crate::Cli;

#[test]
fn every_xtask_command_in_the_readme_parses() {
    let text = readme();
    let mut checked = 0;
    for line in shell_lines(&text).into_iter().chain(inline_spans(&text)) {
        // `cargo xtask bench ...` names a family, not a command.
        if line.contains("...") {
            continue;
        }
        for argv in expand(&line) {
            // Environment assignments first (VMR_LAB_CPUS=1 ...), then `cargo xtask`.
            let words: Vec<&str> = argv
                .iter()
                .map(String::as_str)
                .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                .collect();
            let ["cargo", "xtask", rest @ ..] = words.as_slice() else {
                continue;
            };
            let argv = std::iter::once("xtask").chain(rest.iter().copied());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("README command `{line}` is not an xtask command:\n{e}");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "only {checked} xtask commands found in the README"
    );
}
