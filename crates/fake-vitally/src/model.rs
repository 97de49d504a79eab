//! The records the fake stores, in the JSON shape Vitally returns them, and the
//! fixture types used to seed them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Free-form key/value traits as Vitally stores them.
pub type Traits = serde_json::Map<String, Value>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Organization {
    pub id: String,
    pub external_id: String,
    pub name: String,
    pub traits: Traits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: String,
    pub external_id: String,
    pub name: String,
    pub organization_id: Option<String>,
    pub traits: Traits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub external_id: String,
    /// Optional in Vitally: a user may be created with neither name nor email.
    pub name: Option<String>,
    pub email: Option<String>,
    pub account_ids: Vec<String>,
    pub organization_ids: Vec<String>,
    pub traits: Traits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomObject {
    pub id: String,
    pub name: String,
    pub label: String,
    /// Vitally returns the object's fields inline; they are also listed, sorted by
    /// label, by `GET /resources/customFields`.
    pub custom_fields: Vec<CustomField>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomField {
    pub id: String,
    pub label: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// The key trait values must be written under, e.g. `vitally.custom.aiTags`.
    pub path: String,
    pub created_at: DateTime<Utc>,
    /// Always `"CustomObject"` here.
    pub model: String,
}

/// The custom field types the fake accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Textarea,
    Datetime,
    Number,
    Boolean,
}

impl FieldType {
    /// Whether `value` may be stored in a field of this type (`null` always may).
    pub fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (Self::String | Self::Textarea, Value::String(_)) => true,
            (Self::Number, Value::Number(_)) => true,
            (Self::Boolean, Value::Bool(_)) => true,
            (Self::Datetime, Value::String(s)) => DateTime::parse_from_rfc3339(s).is_ok(),
            _ => false,
        }
    }

    pub(crate) fn expectation(self) -> &'static str {
        match self {
            Self::String | Self::Textarea => "a JSON string",
            Self::Number => "a JSON number",
            Self::Boolean => "a JSON boolean",
            Self::Datetime => "an RFC 3339 timestamp with a zone",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id: String,
    pub external_id: String,
    pub name: String,
    pub custom_object_id: String,
    pub customer_id: Option<String>,
    pub organization_id: Option<String>,
    pub traits: Traits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of a list endpoint: `{"results": [...], "next": "<cursor>" | null}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub results: Vec<T>,
    pub next: Option<String>,
}

/// A required string sent as `null` is treated like a missing one, so the error
/// names the field ("name is required") instead of a JSON type mismatch.
fn null_as_empty<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    Option::<String>::deserialize(de).map(Option::unwrap_or_default)
}

/// Data to preload. Entries may carry their own `id` (so later entries can refer to
/// them); without one the fake generates a UUID. Entries are inserted in the order
/// organizations, accounts, users, custom objects, instances, under the same rules
/// as the HTTP API; the whole fixture is applied or none of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Fixture {
    pub organizations: Vec<OrganizationSeed>,
    pub accounts: Vec<AccountSeed>,
    pub users: Vec<UserSeed>,
    pub custom_objects: Vec<CustomObjectSeed>,
    pub instances: Vec<InstanceSeed>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OrganizationSeed {
    pub id: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub external_id: String,
    #[serde(deserialize_with = "null_as_empty")]
    pub name: String,
    pub traits: Traits,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AccountSeed {
    pub id: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub external_id: String,
    #[serde(deserialize_with = "null_as_empty")]
    pub name: String,
    pub organization_id: Option<String>,
    pub traits: Traits,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UserSeed {
    pub id: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub external_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub account_ids: Vec<String>,
    pub organization_ids: Vec<String>,
    pub traits: Traits,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CustomObjectSeed {
    pub id: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub name: String,
    /// Defaults to `name`.
    pub label: Option<String>,
    pub fields: Vec<FieldSeed>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldSeed {
    pub label: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceSeed {
    pub id: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub external_id: String,
    #[serde(deserialize_with = "null_as_empty")]
    pub name: String,
    #[serde(deserialize_with = "null_as_empty")]
    pub custom_object_id: String,
    pub customer_id: Option<String>,
    pub organization_id: Option<String>,
    pub traits: Traits,
}

/// Everything the fake holds, in creation order. Each custom object carries its
/// fields in `customFields`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateDump {
    pub organizations: Vec<Organization>,
    pub accounts: Vec<Account>,
    pub users: Vec<User>,
    pub custom_objects: Vec<CustomObject>,
    pub instances: Vec<Instance>,
}
