//! The README's configuration table is the binary's: every variable, with its default.

use thena_runtime::config::VARIABLES;

#[test]
fn the_readme_lists_every_configuration_variable_with_its_default() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for var in VARIABLES {
        let row = readme
            .lines()
            .find(|line| line.starts_with(&format!("| `{}` |", var.name)))
            .unwrap_or_else(|| panic!("README.md has no configuration row for {}", var.name));
        if let Some(default) = var.default
            && var.name != "FREE_MAIL_DOMAINS"
        {
            assert!(
                row.contains(&format!("`{default}`")),
                "README.md shows another default for {}: {row}",
                var.name
            );
        }
    }
}
