//! The "Thena Requests" custom object and its traits: the product doc's, plus the few this
//! integration adds. Provisioning creates exactly these; mapping writes exactly these.

use serde::{Deserialize, Serialize};

/// Name (and label) of the custom object the integration creates in Vitally.
pub const OBJECT_NAME: &str = "Thena Requests";

/// A Vitally custom field type, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Textarea,
    Datetime,
    Number,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Textarea => "textarea",
            FieldType::Datetime => "datetime",
            FieldType::Number => "number",
        }
    }
}

/// Labels of the fixed traits (the instance `name` is the 22nd, a built-in).
pub mod label {
    pub const AI_TAGS: &str = "AI Tags";
    pub const ASSIGNED_TO: &str = "Assigned To";
    pub const CSAT: &str = "CSAT";
    pub const CUSTOMER_THREAD: &str = "Customer Thread";
    pub const INTERNAL_THREAD: &str = "Internal Thread";
    pub const MESSAGE_TEXT: &str = "Message Text";
    pub const PERMALINK: &str = "Permalink";
    pub const CLOSED_AT: &str = "Request Closed At";
    pub const CLOSED_BY: &str = "Request Closed By";
    pub const CREATED_AT: &str = "Request Created At";
    pub const NOTIFICATION_LINK: &str = "Request Internal Notification Link";
    pub const REQUESTOR: &str = "Requestor";
    pub const UPDATED_AT: &str = "Request Updated At";
    pub const WEB_LINK: &str = "Request Web Link";
    pub const SENTIMENT: &str = "Sentiment";
    pub const STATUS: &str = "Status";
    pub const SUMMARY: &str = "Summary";
    pub const REQUEST_ID: &str = "Thena Request Id";
    pub const TITLE: &str = "Title";
    pub const URGENCY: &str = "Urgency";
    /// Not in the product doc: the channel the request came from.
    pub const SOURCE: &str = "Source";
}

/// The product doc's fixed traits with their types (the table's 22 are these, the built-in
/// `name`, and "Custom Tags And Categories", one `String` trait per category).
pub const FIXED_TRAITS: [(&str, FieldType); 20] = [
    (label::AI_TAGS, FieldType::String),
    (label::ASSIGNED_TO, FieldType::String),
    (label::CSAT, FieldType::Textarea),
    (label::CUSTOMER_THREAD, FieldType::Textarea),
    (label::INTERNAL_THREAD, FieldType::Textarea),
    (label::MESSAGE_TEXT, FieldType::Textarea),
    (label::PERMALINK, FieldType::String),
    (label::CLOSED_AT, FieldType::Datetime),
    (label::CLOSED_BY, FieldType::String),
    (label::CREATED_AT, FieldType::Datetime),
    (label::NOTIFICATION_LINK, FieldType::String),
    (label::REQUESTOR, FieldType::String),
    (label::UPDATED_AT, FieldType::Datetime),
    (label::WEB_LINK, FieldType::String),
    (label::SENTIMENT, FieldType::String),
    (label::STATUS, FieldType::String),
    (label::SUMMARY, FieldType::Textarea),
    (label::REQUEST_ID, FieldType::Number),
    (label::TITLE, FieldType::Textarea),
    (label::URGENCY, FieldType::String),
];

/// Traits beyond the product doc's table: Source ("Slack", "Email", "Web", "Microsoft
/// Teams"), so a CSM can tell and filter where a request came from.
pub const EXTRA_TRAITS: [(&str, FieldType); 1] = [(label::SOURCE, FieldType::String)];

/// Every trait the integration owns apart from the custom categories: the product doc's,
/// then the extra ones. Provisioning creates them, mapping writes them.
pub fn own_traits() -> impl Iterator<Item = (&'static str, FieldType)> + Clone {
    FIXED_TRAITS.iter().chain(EXTRA_TRAITS.iter()).copied()
}
