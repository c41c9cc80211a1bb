//! `domsnap`: the command-line front end. The subcommands arrive with the `snapshot-core` issue.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("domsnap: no subcommands yet; see README.md for what is built so far")
}
