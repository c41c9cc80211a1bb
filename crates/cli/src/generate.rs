//! Shell completions and the man page, generated from the clap definitions (so they never
//! drift from the commands).

use std::io::Write;

use anyhow::{Context, Result};

/// The shells `domsnap completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    /// bash (e.g. `domsnap completions bash > /etc/bash_completion.d/domsnap`).
    Bash,
    /// zsh (a `_domsnap` file in a folder of `$fpath`).
    Zsh,
    /// fish (`~/.config/fish/completions/domsnap.fish`).
    Fish,
}

/// Writes the completion script for `shell` of `command` to `out`.
pub fn completions(shell: Shell, command: &mut clap::Command, out: &mut dyn Write) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let name = command.get_name().to_owned();
    clap_complete::generate(shell, command, name, out);
}

/// Writes the man page (roff, section 1) of `command` to `out`.
pub fn man(command: clap::Command, out: &mut dyn Write) -> Result<()> {
    clap_mangen::Man::new(command)
        .render(out)
        .context("cannot write the man page")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("domsnap")
            .about("whole-domain snapshots")
            .subcommand(clap::Command::new("snapshot").about("create, list, delete and revert"))
    }

    #[test]
    fn completions_and_the_man_page_name_the_commands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, &mut command(), &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("snapshot"), "{shell:?}: {text}");
        }
        let mut out = Vec::new();
        man(command(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{text}");
        assert!(
            text.contains("domsnap\\-snapshot") || text.contains("snapshot"),
            "{text}"
        );
    }
}
