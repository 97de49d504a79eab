use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counts of `/resources` calls (admin `/_fake` calls are not counted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    /// Keyed by method and route template with every parameter written `:id`, e.g.
    /// `"PUT /resources/customObjects/:id/instances/:id"`. A path that matches no
    /// route is keyed by the literal path.
    pub by_route: BTreeMap<String, u64>,
    /// Keyed by response status. Dropped connections have no status and are only
    /// counted in `by_route` and `total`.
    pub by_status: BTreeMap<u16, u64>,
    pub total: u64,
}

impl CallCounts {
    pub fn route(&self, key: &str) -> u64 {
        self.by_route.get(key).copied().unwrap_or(0)
    }

    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    pub(crate) fn record(&mut self, route: String, status: Option<u16>) {
        *self.by_route.entry(route).or_default() += 1;
        if let Some(status) = status {
            *self.by_status.entry(status).or_default() += 1;
        }
        self.total += 1;
    }
}

/// `/resources/customObjects/{id}/instances/{instance_id}` →
/// `/resources/customObjects/:id/instances/:id`.
pub(crate) fn route_template(matched: &str) -> String {
    matched
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                ":id"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_parameters_are_all_written_as_id() {
        assert_eq!(
            route_template("/resources/customObjects/{id}/instances/{instance_id}"),
            "/resources/customObjects/:id/instances/:id"
        );
        assert_eq!(
            route_template("/resources/users/search"),
            "/resources/users/search"
        );
    }
}
