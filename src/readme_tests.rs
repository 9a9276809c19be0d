//! The README against the tree: its two commands, every file it names, every `vmr` command
//! line and flag it shows, and its config example must exist and parse. A README that promises
//! what the tree does not have fails here.

use clap::{CommandFactory, Parser};
use vmr_tests::readme::{code_blocks, expand, inline_spans, readme, shell_lines, top_level};
use vmr_tests::repo_root;

use super::Cli;

/// Every long flag of every `vmr` subcommand, from clap's own description of the CLI.
fn all_vmr_flags() -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        out.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_long())
                .map(|l| format!("--{l}")),
        );
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut flags = vec!["--help".to_string(), "--version".to_string()];
    walk(&Cli::command(), &mut flags);
    flags
}

#[test]
fn the_two_commands_exist() {
    let text = readme();
    let section = text
        .split("## The two commands")
        .nth(1)
        .expect("the README has a section '## The two commands'");
    let (_, block) = code_blocks(section)
        .into_iter()
        .next()
        .expect("it has a code block");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands, ["bash demo.sh", "bash test.sh"]);
    for script in ["demo.sh", "test.sh", ".ci/run"] {
        let path = repo_root().join(script);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(text.starts_with("#!"), "{script} is not a script");
    }
}

#[test]
fn every_vmr_command_line_parses() {
    let mut checked = 0;
    let text = readme();
    let lines = shell_lines(&text).into_iter().chain(
        inline_spans(&text)
            .into_iter()
            .filter(|s| s.starts_with("vmr ")),
    );
    for line in lines.filter(|l| l.starts_with("vmr ")) {
        for argv in expand(&line) {
            // `--help` ends parsing with a "help" error that is no failure.
            match Cli::try_parse_from(&argv) {
                Ok(_) => {}
                Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {}
                Err(e) => panic!("README command `{}` does not parse:\n{e}", argv.join(" ")),
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} vmr command lines found in the README"
    );
}

#[test]
fn every_flag_named_inline_exists() {
    let flags = all_vmr_flags();
    let lab = std::fs::read_to_string(repo_root().join("images/lab")).unwrap();
    for span in inline_spans(&readme()) {
        let Some(flag) = span
            .split([' ', '='])
            .next()
            .filter(|f| f.starts_with("--"))
        else {
            continue;
        };
        assert!(
            flags.iter().any(|f| f == flag) || lab.contains(flag),
            "the README names the flag {flag}, which neither vmr nor images/lab has"
        );
    }
}

#[test]
fn every_file_it_names_exists() {
    let text = readme();
    let root = repo_root();
    let top = top_level();
    // Inline code, link targets, and the words of the shell lines.
    let mut candidates = inline_spans(&text);
    candidates.extend(
        text.split("](")
            .skip(1)
            .filter_map(|s| s.split(')').next())
            .map(String::from),
    );
    candidates.extend(
        shell_lines(&text)
            .iter()
            .flat_map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>()),
    );
    let mut checked = 0;
    for candidate in candidates {
        let path = candidate
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches(['.', ',']);
        let first = path.split('/').next().unwrap_or("");
        let is_file = top.iter().any(|t| t == path) && path.contains('.');
        if !(is_file || path.contains('/') && top.iter().any(|t| t == first)) {
            continue;
        }
        let full = root.join(path);
        let exists = match path.rsplit_once("/*") {
            // A glob such as tests/lab/*.sh: its folder holds at least one match.
            Some((dir, suffix)) => std::fs::read_dir(root.join(dir))
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(suffix))
                })
                .unwrap_or(false),
            None => full.exists(),
        };
        assert!(exists, "the README names {path}, which does not exist");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} paths found in the README");
}

#[test]
fn the_config_example_parses() {
    let text = readme();
    let toml = code_blocks(&text)
        .into_iter()
        .find(|(info, _)| info == "toml")
        .expect("the README shows a config file")
        .1;
    let (config, replication) = crate::config::parse(&toml).expect("the README's config parses");
    config.validate().expect("the README's config is valid");
    assert!(
        !replication.standbys.is_empty(),
        "the README shows the [replication] table"
    );
}

#[test]
fn every_subcommand_help_has_an_example() {
    fn walk(cmd: &mut clap::Command, path: &str) {
        let name = format!("{path} {}", cmd.get_name());
        let has_subcommands = cmd.get_subcommands().next().is_some();
        let help = cmd.render_long_help().to_string();
        // Leaf subcommands without arguments (status, pause...) are examples themselves.
        if has_subcommands || cmd.get_arguments().any(|a| !a.is_global_set()) {
            assert!(
                help.contains("Example") || path.contains("ctl"),
                "`{name} --help` shows no example"
            );
        }
        for sub in cmd.get_subcommands_mut().filter(|s| s.get_name() != "help") {
            walk(sub, &name);
        }
    }
    walk(&mut Cli::command(), "");
}
