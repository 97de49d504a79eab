//! The README's configuration table is the binary's: every variable, with its default
//! and the range the binary enforces.

use thena_runtime::config::VARIABLES;

#[test]
fn the_readme_lists_every_configuration_variable_with_its_default_and_range() {
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
        let allowed = var.rule.describe();
        assert!(
            row.contains(&format!(" | {allowed} | ")),
            "README.md shows another range for {} (the binary allows {allowed}): {row}",
            var.name
        );
    }
}
