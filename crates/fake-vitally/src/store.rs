//! The in-memory data and every rule the API enforces on it. Synchronous and free of
//! HTTP, so the handlers and fixture seeding share one set of rules.
//!
//! Tables are vectors in creation order (only instances and custom objects are ever
//! removed), so a record's index order is its creation order, which pagination relies on.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{
    error::{ApiError, bad_request},
    model::{
        Account, AccountSeed, CustomField, CustomObject, CustomObjectSeed, FieldSeed, Fixture,
        Instance, InstanceSeed, Organization, OrganizationSeed, Page, StateDump, Traits, User,
        UserSeed,
    },
    query::PageRequest,
};

/// Vitally reports millisecond timestamps; truncating keeps the dump, the JSON and
/// `updatedAt` cursors in agreement. Each call is at least 1 ms after the previous one, so
/// `updatedAt` order is write order even when two writes land in the same millisecond
/// (a release build seeds and updates within one).
pub(crate) fn now() -> DateTime<Utc> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(0);
    let wall = Utc::now().timestamp_millis();
    let previous = LAST_MS
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(wall.max(last + 1))
        })
        .unwrap_or(wall);
    DateTime::from_timestamp_millis(wall.max(previous + 1)).unwrap_or_else(Utc::now)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    organizations: Vec<Organization>,
    accounts: Vec<Account>,
    users: Vec<User>,
    custom_objects: Vec<CustomObject>,
    instances: Vec<Instance>,
}

/// Deserializes a present-but-`null` field as `Some(None)`, so a PATCH-like body can
/// tell "clear this" from "leave it alone" (missing, via `#[serde(default)]`).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    de: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(de).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct OrganizationPatch {
    name: Option<String>,
    traits: Traits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct AccountPatch {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    organization_id: Option<Option<String>>,
    traits: Traits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct UserPatch {
    #[serde(deserialize_with = "nullable")]
    name: Option<Option<String>>,
    #[serde(deserialize_with = "nullable")]
    email: Option<Option<String>>,
    account_ids: Option<Vec<String>>,
    organization_ids: Option<Vec<String>>,
    traits: Traits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct InstancePatch {
    name: Option<String>,
    external_id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    customer_id: Option<Option<String>>,
    #[serde(deserialize_with = "nullable")]
    organization_id: Option<Option<String>>,
    traits: Traits,
}

pub(crate) enum UserQuery<'a> {
    Email(&'a str),
    ExternalId(&'a str),
    EmailDomain(&'a str),
}

pub(crate) enum InstanceQuery<'a> {
    ExternalId(&'a str),
    Id(&'a str),
    CustomerId(&'a str),
    OrganizationId(&'a str),
}

fn require(value: &str, name: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        Err(bad_request(format!("{name} is required")))
    } else {
        Ok(())
    }
}

/// Applies a traits update: a `null` value removes the trait.
fn merge_traits(traits: &mut Traits, patch: Traits) {
    for (key, value) in patch {
        if value.is_null() {
            traits.remove(&key);
        } else {
            traits.insert(key, value);
        }
    }
}

fn without_nulls(mut traits: Traits) -> Traits {
    traits.retain(|_, value| !value.is_null());
    traits
}

/// A record found by Vitally id first, then by externalId.
fn find_by_key<'a, T>(
    records: &'a [T],
    key: &str,
    id: impl Fn(&T) -> &str,
    external_id: impl Fn(&T) -> &str,
) -> Option<(usize, &'a T)> {
    let index = records
        .iter()
        .position(|r| id(r) == key)
        .or_else(|| records.iter().position(|r| external_id(r) == key))?;
    Some((index, &records[index]))
}

fn email_domain(email: &str) -> Option<&str> {
    email.rsplit_once('@').map(|(_, domain)| domain)
}

/// The camelCase key Vitally derives from a field label: words split at
/// non-alphanumerics and at case changes, first word lowercased, the rest
/// capitalised ("AI Tags" → "aiTags", "Thena Request Id" → "thenaRequestId").
pub(crate) fn field_key(label: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    for chunk in label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|c| !c.is_empty())
    {
        let chars: Vec<char> = chunk.chars().collect();
        let mut start = 0;
        for i in 1..chars.len() {
            let (prev, cur) = (chars[i - 1], chars[i]);
            let next_is_lower = chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            // "requestId" splits before "I"; "HTTPServer" splits before "S".
            if cur.is_ascii_uppercase()
                && (prev.is_ascii_lowercase()
                    || prev.is_ascii_digit()
                    || (prev.is_ascii_uppercase() && next_is_lower))
            {
                words.push(chars[start..i].iter().collect());
                start = i;
            }
        }
        words.push(chars[start..].iter().collect());
    }
    let mut key = String::new();
    for (n, word) in words.iter().enumerate() {
        let lower = word.to_ascii_lowercase();
        if n == 0 {
            key.push_str(&lower);
        } else {
            let mut chars = lower.chars();
            if let Some(first) = chars.next() {
                key.push(first.to_ascii_uppercase());
                key.push_str(chars.as_str());
            }
        }
    }
    key
}

impl Store {
    pub(crate) fn dump(&self) -> StateDump {
        StateDump {
            organizations: self.organizations.clone(),
            accounts: self.accounts.clone(),
            users: self.users.clone(),
            custom_objects: self.custom_objects.clone(),
            instances: self.instances.clone(),
        }
    }

    pub(crate) fn instances(&self) -> Vec<Instance> {
        self.instances.clone()
    }

    /// Applies a whole fixture or, on the first invalid entry, fails naming it.
    /// The caller applies it to a copy so a failure leaves nothing behind.
    pub(crate) fn apply_fixture(&mut self, fixture: Fixture) -> Result<(), String> {
        fn at<T>(kind: &str, n: usize, result: Result<T, ApiError>) -> Result<T, String> {
            result.map_err(|e| format!("{kind}[{n}]: {e}"))
        }
        let now = now();
        for (n, seed) in fixture.organizations.into_iter().enumerate() {
            at("organizations", n, self.create_organization(seed, now))?;
        }
        for (n, seed) in fixture.accounts.into_iter().enumerate() {
            at("accounts", n, self.create_account(seed, now))?;
        }
        for (n, seed) in fixture.users.into_iter().enumerate() {
            if self.users.iter().any(|u| u.external_id == seed.external_id) {
                return Err(format!(
                    "users[{n}]: a user with externalId {:?} already exists",
                    seed.external_id
                ));
            }
            // State, not an API call: a user left in no account or organization (e.g.
            // removed from them later) is real, and the linking table has a row for it.
            at("users", n, self.upsert_user(seed, now, Links::MayBeEmpty))?;
        }
        for (n, seed) in fixture.custom_objects.into_iter().enumerate() {
            at("customObjects", n, self.create_custom_object(seed, now))?;
        }
        for (n, seed) in fixture.instances.into_iter().enumerate() {
            let object_id = seed.custom_object_id.clone();
            let result = self
                .custom_object_index(&object_id)
                .map_err(|_| bad_request(format!("no custom object with id {object_id:?}")))
                .and_then(|_| self.create_instance(&object_id, seed, now));
            at("instances", n, result)?;
        }
        Ok(())
    }

    fn fresh_id<T>(
        records: &[T],
        id: Option<String>,
        record_id: impl Fn(&T) -> &str,
    ) -> Result<String, ApiError> {
        match id {
            None => Ok(new_id()),
            Some(id) if id.trim().is_empty() => Err(bad_request("id must not be empty")),
            Some(id) if records.iter().any(|r| record_id(r) == id) => {
                Err(bad_request(format!("id {id:?} is already taken")))
            }
            Some(id) => Ok(id),
        }
    }

    // --- organizations ---

    pub(crate) fn create_organization(
        &mut self,
        seed: OrganizationSeed,
        now: DateTime<Utc>,
    ) -> Result<Organization, ApiError> {
        require(&seed.external_id, "externalId")?;
        require(&seed.name, "name")?;
        if self
            .organizations
            .iter()
            .any(|o| o.external_id == seed.external_id)
        {
            return Err(bad_request(format!(
                "an organization with externalId {:?} already exists",
                seed.external_id
            )));
        }
        let organization = Organization {
            id: Self::fresh_id(&self.organizations, seed.id, |o| &o.id)?,
            external_id: seed.external_id,
            name: seed.name,
            traits: without_nulls(seed.traits),
            created_at: now,
            updated_at: now,
        };
        self.organizations.push(organization.clone());
        Ok(organization)
    }

    fn organization_index(&self, key: &str) -> Result<usize, ApiError> {
        find_by_key(
            &self.organizations,
            key,
            |o| o.id.as_str(),
            |o| o.external_id.as_str(),
        )
        .map(|(index, _)| index)
        .ok_or(ApiError::NotFound)
    }

    pub(crate) fn organization(&self, key: &str) -> Result<Organization, ApiError> {
        Ok(self.organizations[self.organization_index(key)?].clone())
    }

    pub(crate) fn list_organizations(&self, page: &PageRequest) -> Page<Organization> {
        page.page(self.organizations.iter().enumerate(), |o| o.updated_at)
    }

    pub(crate) fn update_organization(
        &mut self,
        key: &str,
        patch: OrganizationPatch,
        now: DateTime<Utc>,
    ) -> Result<Organization, ApiError> {
        let index = self.organization_index(key)?;
        if let Some(name) = &patch.name {
            require(name, "name")?;
        }
        let organization = &mut self.organizations[index];
        if let Some(name) = patch.name {
            organization.name = name;
        }
        merge_traits(&mut organization.traits, patch.traits);
        organization.updated_at = now;
        Ok(organization.clone())
    }

    pub(crate) fn organization_accounts(
        &self,
        key: &str,
        page: &PageRequest,
    ) -> Result<Page<Account>, ApiError> {
        let id = &self.organizations[self.organization_index(key)?].id;
        let accounts = self
            .accounts
            .iter()
            .enumerate()
            .filter(|(_, a)| a.organization_id.as_ref() == Some(id));
        Ok(page.page(accounts, |a| a.updated_at))
    }

    /// A 400 unless `id` is the Vitally id of an organization, with a hint when the
    /// caller passed an externalId instead.
    fn check_organization_id(&self, id: &str, field: &str) -> Result<(), ApiError> {
        if self.organizations.iter().any(|o| o.id == id) {
            return Ok(());
        }
        let hint = if self.organizations.iter().any(|o| o.external_id == id) {
            " (that is an externalId; use the organization's Vitally id)"
        } else {
            ""
        };
        Err(bad_request(format!(
            "{field}: no organization with id {id:?}{hint}"
        )))
    }

    // --- accounts ---

    pub(crate) fn create_account(
        &mut self,
        seed: AccountSeed,
        now: DateTime<Utc>,
    ) -> Result<Account, ApiError> {
        require(&seed.external_id, "externalId")?;
        require(&seed.name, "name")?;
        if let Some(org) = &seed.organization_id {
            self.check_organization_id(org, "organizationId")?;
        }
        if self
            .accounts
            .iter()
            .any(|a| a.external_id == seed.external_id)
        {
            return Err(bad_request(format!(
                "an account with externalId {:?} already exists",
                seed.external_id
            )));
        }
        let account = Account {
            id: Self::fresh_id(&self.accounts, seed.id, |a| &a.id)?,
            external_id: seed.external_id,
            name: seed.name,
            organization_id: seed.organization_id,
            traits: without_nulls(seed.traits),
            created_at: now,
            updated_at: now,
        };
        self.accounts.push(account.clone());
        Ok(account)
    }

    fn account_index(&self, key: &str) -> Result<usize, ApiError> {
        find_by_key(
            &self.accounts,
            key,
            |a| a.id.as_str(),
            |a| a.external_id.as_str(),
        )
        .map(|(index, _)| index)
        .ok_or(ApiError::NotFound)
    }

    pub(crate) fn account(&self, key: &str) -> Result<Account, ApiError> {
        Ok(self.accounts[self.account_index(key)?].clone())
    }

    pub(crate) fn list_accounts(&self, page: &PageRequest) -> Page<Account> {
        page.page(self.accounts.iter().enumerate(), |a| a.updated_at)
    }

    pub(crate) fn update_account(
        &mut self,
        key: &str,
        patch: AccountPatch,
        now: DateTime<Utc>,
    ) -> Result<Account, ApiError> {
        let index = self.account_index(key)?;
        if let Some(name) = &patch.name {
            require(name, "name")?;
        }
        if let Some(Some(org)) = &patch.organization_id {
            self.check_organization_id(org, "organizationId")?;
        }
        let account = &mut self.accounts[index];
        if let Some(name) = patch.name {
            account.name = name;
        }
        if let Some(org) = patch.organization_id {
            account.organization_id = org;
        }
        merge_traits(&mut account.traits, patch.traits);
        account.updated_at = now;
        Ok(account.clone())
    }

    pub(crate) fn account_users(
        &self,
        key: &str,
        page: &PageRequest,
    ) -> Result<Page<User>, ApiError> {
        let id = &self.accounts[self.account_index(key)?].id;
        let users = self
            .users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.account_ids.contains(id));
        Ok(page.page(users, |u| u.updated_at))
    }

    fn check_account_id(&self, id: &str, field: &str) -> Result<(), ApiError> {
        if self.accounts.iter().any(|a| a.id == id) {
            return Ok(());
        }
        let hint = if self.accounts.iter().any(|a| a.external_id == id) {
            " (that is an externalId; use the account's Vitally id)"
        } else {
            ""
        };
        Err(bad_request(format!(
            "{field}: no account with id {id:?}{hint}"
        )))
    }

    // --- users ---

    fn check_user_links(
        &self,
        account_ids: &[String],
        org_ids: &[String],
        links: Links,
    ) -> Result<(), ApiError> {
        if links == Links::Required && account_ids.is_empty() && org_ids.is_empty() {
            return Err(bad_request(
                "at least one of accountIds or organizationIds is required",
            ));
        }
        for id in account_ids {
            self.check_account_id(id, "accountIds")?;
        }
        for id in org_ids {
            self.check_organization_id(id, "organizationIds")?;
        }
        Ok(())
    }

    /// Creates a user, or updates the one with the same externalId: name and email
    /// are overwritten when given, `accountIds`/`organizationIds` replace the old
    /// lists, traits merge. Returns the user and whether it was created.
    pub(crate) fn upsert_user(
        &mut self,
        seed: UserSeed,
        now: DateTime<Utc>,
        links: Links,
    ) -> Result<(User, bool), ApiError> {
        require(&seed.external_id, "externalId")?;
        self.check_user_links(&seed.account_ids, &seed.organization_ids, links)?;
        if let Some(user) = self
            .users
            .iter_mut()
            .find(|u| u.external_id == seed.external_id)
        {
            if seed.name.is_some() {
                user.name = seed.name;
            }
            if seed.email.is_some() {
                user.email = seed.email;
            }
            user.account_ids = seed.account_ids;
            user.organization_ids = seed.organization_ids;
            merge_traits(&mut user.traits, seed.traits);
            user.updated_at = now;
            return Ok((user.clone(), false));
        }
        let user = User {
            id: Self::fresh_id(&self.users, seed.id, |u| &u.id)?,
            external_id: seed.external_id,
            name: seed.name,
            email: seed.email,
            account_ids: seed.account_ids,
            organization_ids: seed.organization_ids,
            traits: without_nulls(seed.traits),
            created_at: now,
            updated_at: now,
        };
        self.users.push(user.clone());
        Ok((user, true))
    }

    pub(crate) fn search_users(&self, query: UserQuery<'_>) -> Vec<User> {
        let matches = |user: &User| match query {
            UserQuery::Email(email) => user
                .email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(email)),
            UserQuery::ExternalId(external) => user.external_id == external,
            UserQuery::EmailDomain(domain) => user
                .email
                .as_deref()
                .and_then(email_domain)
                .is_some_and(|d| d.eq_ignore_ascii_case(domain)),
        };
        self.users.iter().filter(|u| matches(u)).cloned().collect()
    }

    pub(crate) fn update_user(
        &mut self,
        key: &str,
        patch: UserPatch,
        now: DateTime<Utc>,
    ) -> Result<User, ApiError> {
        let (index, current) = find_by_key(
            &self.users,
            key,
            |u| u.id.as_str(),
            |u| u.external_id.as_str(),
        )
        .ok_or(ApiError::NotFound)?;
        let account_ids = patch.account_ids.as_ref().unwrap_or(&current.account_ids);
        let org_ids = patch
            .organization_ids
            .as_ref()
            .unwrap_or(&current.organization_ids);
        self.check_user_links(account_ids, org_ids, Links::Required)?;
        let user = &mut self.users[index];
        if let Some(name) = patch.name {
            user.name = name;
        }
        if let Some(email) = patch.email {
            user.email = email;
        }
        if let Some(ids) = patch.account_ids {
            user.account_ids = ids;
        }
        if let Some(ids) = patch.organization_ids {
            user.organization_ids = ids;
        }
        merge_traits(&mut user.traits, patch.traits);
        user.updated_at = now;
        Ok(user.clone())
    }

    // --- custom objects and fields ---

    fn custom_object_index(&self, id: &str) -> Result<usize, ApiError> {
        self.custom_objects
            .iter()
            .position(|o| o.id == id)
            .ok_or(ApiError::NotFound)
    }

    pub(crate) fn create_custom_object(
        &mut self,
        seed: CustomObjectSeed,
        now: DateTime<Utc>,
    ) -> Result<CustomObject, ApiError> {
        require(&seed.name, "name")?;
        if self.custom_objects.iter().any(|o| o.name == seed.name) {
            return Err(bad_request(format!(
                "a custom object named {:?} already exists",
                seed.name
            )));
        }
        let mut object = CustomObject {
            id: Self::fresh_id(&self.custom_objects, seed.id, |o| &o.id)?,
            label: seed.label.unwrap_or_else(|| seed.name.clone()),
            name: seed.name,
            custom_fields: Vec::new(),
            created_at: now,
            updated_at: now,
        };
        add_fields(&mut object, seed.fields, now)?;
        self.custom_objects.push(object.clone());
        Ok(object)
    }

    /// Someone deleted the object in Vitally's UI (the REST API cannot): it and its
    /// instances are gone, and calls on it answer 404. `false` if there was none.
    pub(crate) fn delete_custom_object(&mut self, id: &str) -> bool {
        let before = self.custom_objects.len();
        self.custom_objects.retain(|o| o.id != id);
        self.instances.retain(|i| i.custom_object_id != id);
        self.custom_objects.len() < before
    }

    pub(crate) fn list_custom_objects(&self, page: &PageRequest) -> Page<CustomObject> {
        page.page(self.custom_objects.iter().enumerate(), |o| o.updated_at)
    }

    /// Adds fields to an object. Like the real API it does not dedupe by label: a
    /// second "Status" gets path `vitally.custom.status2`.
    pub(crate) fn update_custom_object(
        &mut self,
        id: &str,
        label: Option<String>,
        fields: Vec<FieldSeed>,
        now: DateTime<Utc>,
    ) -> Result<CustomObject, ApiError> {
        let index = self.custom_object_index(id)?;
        let mut object = self.custom_objects[index].clone();
        if let Some(label) = label {
            require(&label, "label")?;
            object.label = label;
        }
        add_fields(&mut object, fields, now)?;
        object.updated_at = now;
        self.custom_objects[index] = object.clone();
        Ok(object)
    }

    /// The object's fields ordered by label, as `GET /resources/customFields` lists
    /// them.
    pub(crate) fn custom_fields(&self, object_id: &str) -> Result<Vec<CustomField>, ApiError> {
        let mut fields = self.custom_objects[self.custom_object_index(object_id)?]
            .custom_fields
            .clone();
        fields.sort_by_cached_key(|f| f.label.to_lowercase());
        Ok(fields)
    }

    // --- custom object instances ---

    fn check_instance_links(
        &self,
        customer_id: Option<&str>,
        organization_id: Option<&str>,
    ) -> Result<(), ApiError> {
        if customer_id.is_none() && organization_id.is_none() {
            return Err(bad_request(
                "at least one of customerId or organizationId is required",
            ));
        }
        if let Some(id) = customer_id {
            self.check_account_id(id, "customerId")?;
        }
        if let Some(id) = organization_id {
            self.check_organization_id(id, "organizationId")?;
        }
        Ok(())
    }

    /// Every trait key must be the `path` of one of the object's fields and every
    /// value must fit that field's type (`null` always does).
    fn check_traits(&self, object: &CustomObject, traits: &Traits) -> Result<(), ApiError> {
        for (key, value) in traits {
            let Some(field) = object.custom_fields.iter().find(|f| f.path == *key) else {
                let hint = object
                    .custom_fields
                    .iter()
                    .find(|f| f.label == *key)
                    .map(|f| {
                        format!(
                            " ({key:?} is a field label; write under its path {:?})",
                            f.path
                        )
                    })
                    .unwrap_or_default();
                return Err(bad_request(format!(
                    "unknown trait {key:?}: not the path of a field of custom object {:?}{hint}",
                    object.name
                )));
            };
            if !field.field_type.accepts(value) {
                return Err(bad_request(format!(
                    "trait {key:?} is a {:?} field and needs {}, got {}",
                    field.field_type,
                    field.field_type.expectation(),
                    json_kind(value)
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn create_instance(
        &mut self,
        object_id: &str,
        seed: InstanceSeed,
        now: DateTime<Utc>,
    ) -> Result<Instance, ApiError> {
        let object = &self.custom_objects[self.custom_object_index(object_id)?];
        require(&seed.name, "name")?;
        require(&seed.external_id, "externalId")?;
        self.check_instance_links(seed.customer_id.as_deref(), seed.organization_id.as_deref())?;
        self.check_traits(object, &seed.traits)?;
        let instance = Instance {
            id: Self::fresh_id(&self.instances, seed.id, |i| &i.id)?,
            external_id: seed.external_id,
            name: seed.name,
            custom_object_id: object.id.clone(),
            customer_id: seed.customer_id,
            organization_id: seed.organization_id,
            traits: without_nulls(seed.traits),
            created_at: now,
            updated_at: now,
        };
        self.instances.push(instance.clone());
        Ok(instance)
    }

    pub(crate) fn search_instances(
        &self,
        object_id: &str,
        query: InstanceQuery<'_>,
    ) -> Result<Vec<Instance>, ApiError> {
        self.custom_object_index(object_id)?;
        let matches = |i: &Instance| match query {
            InstanceQuery::ExternalId(v) => i.external_id == v,
            InstanceQuery::Id(v) => i.id == v,
            InstanceQuery::CustomerId(v) => i.customer_id.as_deref() == Some(v),
            InstanceQuery::OrganizationId(v) => i.organization_id.as_deref() == Some(v),
        };
        Ok(self
            .instances
            .iter()
            .filter(|i| i.custom_object_id == object_id && matches(i))
            .cloned()
            .collect())
    }

    /// `DELETE …/instances/:id`: the instance is gone (404 if there was none).
    pub(crate) fn delete_instance(
        &mut self,
        object_id: &str,
        instance_id: &str,
    ) -> Result<Instance, ApiError> {
        self.custom_object_index(object_id)?;
        let index = self
            .instances
            .iter()
            .position(|i| i.id == instance_id && i.custom_object_id == object_id)
            .ok_or(ApiError::NotFound)?;
        Ok(self.instances.remove(index))
    }

    pub(crate) fn update_instance(
        &mut self,
        object_id: &str,
        instance_id: &str,
        patch: InstancePatch,
        now: DateTime<Utc>,
    ) -> Result<Instance, ApiError> {
        let object = &self.custom_objects[self.custom_object_index(object_id)?];
        let index = self
            .instances
            .iter()
            .position(|i| i.id == instance_id && i.custom_object_id == object_id)
            .ok_or(ApiError::NotFound)?;
        let current = &self.instances[index];
        if let Some(name) = &patch.name {
            require(name, "name")?;
        }
        if let Some(external_id) = &patch.external_id {
            require(external_id, "externalId")?;
        }
        let customer_id = patch
            .customer_id
            .clone()
            .unwrap_or_else(|| current.customer_id.clone());
        let organization_id = patch
            .organization_id
            .clone()
            .unwrap_or_else(|| current.organization_id.clone());
        self.check_instance_links(customer_id.as_deref(), organization_id.as_deref())?;
        self.check_traits(object, &patch.traits)?;
        let instance = &mut self.instances[index];
        if let Some(name) = patch.name {
            instance.name = name;
        }
        if let Some(external_id) = patch.external_id {
            instance.external_id = external_id;
        }
        instance.customer_id = customer_id;
        instance.organization_id = organization_id;
        merge_traits(&mut instance.traits, patch.traits);
        instance.updated_at = now;
        Ok(instance.clone())
    }
}

fn add_fields(
    object: &mut CustomObject,
    fields: Vec<FieldSeed>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    for field in fields {
        require(&field.label, "custom field label")?;
        let key = field_key(&field.label);
        if key.is_empty() {
            return Err(bad_request(format!(
                "custom field label {:?} has no letters or digits",
                field.label
            )));
        }
        let base = format!("vitally.custom.{key}");
        let taken = |path: &str| object.custom_fields.iter().any(|f| f.path == path);
        let path = std::iter::once(base.clone())
            .chain((2..).map(|n| format!("{base}{n}")))
            .find(|p| !taken(p))
            .unwrap_or(base);
        object.custom_fields.push(CustomField {
            id: new_id(),
            label: field.label,
            field_type: field.field_type,
            path,
            created_at: now,
            model: "CustomObject".to_owned(),
        });
    }
    Ok(())
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string that does not fit",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_keys_are_lower_camel_case_of_the_label() {
        for (label, key) in [
            ("AI Tags", "aiTags"),
            ("Thena Request Id", "thenaRequestId"),
            ("status", "status"),
            ("requestId", "requestId"),
            ("HTTP Server", "httpServer"),
            ("SLA-due (UTC)", "slaDueUtc"),
            ("2nd owner", "2ndOwner"),
            ("!!!", ""),
        ] {
            assert_eq!(field_key(label), key, "label {label:?}");
        }
    }

    #[test]
    fn a_second_field_with_the_same_label_gets_a_numbered_path() {
        let mut store = Store::default();
        let field = |label: &str| FieldSeed {
            label: label.to_owned(),
            field_type: crate::model::FieldType::String,
        };
        let object = store
            .create_custom_object(
                CustomObjectSeed {
                    name: "requests".to_owned(),
                    fields: vec![field("Status"), field("Status"), field("status")],
                    ..Default::default()
                },
                now(),
            )
            .expect("created");
        let paths: Vec<&str> = object
            .custom_fields
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "vitally.custom.status",
                "vitally.custom.status2",
                "vitally.custom.status3"
            ]
        );
    }
}

/// Whether a user must belong to at least one account or organization: the API
/// requires it, a seeded state may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Links {
    Required,
    MayBeEmpty,
}
