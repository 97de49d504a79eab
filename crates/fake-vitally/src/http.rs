//! The `/resources` API: routes, the guard every call passes (auth, rate limit,
//! faults, call counting) and the handlers.

use std::io;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{MatchedPath, Path, Request, State},
    http::{Method, StatusCode, header::AUTHORIZATION},
    middleware::{Next, from_fn_with_state},
    response::Response,
    routing::{get, post, put},
};
use serde::Deserialize;
use tokio::time::Instant;

use crate::{
    FakeVitally, admin,
    calls::route_template,
    error::{ApiError, bad_request, error_response},
    faults::Action,
    limits::Quota,
    model::{
        Account, AccountSeed, CustomField, CustomObject, CustomObjectSeed, FieldSeed, FieldType,
        Instance, InstanceSeed, Organization, OrganizationSeed, Page, User, UserSeed,
    },
    query::{JsonBody, PageRequest, Params},
    store::{
        AccountPatch, InstancePatch, InstanceQuery, OrganizationPatch, UserPatch, UserQuery, now,
    },
};

type ApiResult<T> = Result<Json<T>, ApiError>;

pub(crate) fn router(fake: FakeVitally) -> Router {
    let resources = Router::new()
        .route(
            "/resources/organizations",
            get(list_organizations).post(create_organization),
        )
        .route(
            "/resources/organizations/{id}",
            get(get_organization).put(update_organization),
        )
        .route(
            "/resources/organizations/{id}/accounts",
            get(organization_accounts),
        )
        .route(
            "/resources/accounts",
            get(list_accounts).post(create_account),
        )
        .route(
            "/resources/accounts/{id}",
            get(get_account).put(update_account),
        )
        .route("/resources/accounts/{id}/users", get(account_users))
        .route("/resources/users", post(create_user))
        .route("/resources/users/search", get(search_users))
        .route("/resources/users/{id}", put(update_user))
        .route(
            "/resources/customObjects",
            get(list_custom_objects).post(create_custom_object),
        )
        .route("/resources/customObjects/{id}", put(update_custom_object))
        .route("/resources/customFields", get(list_custom_fields))
        .route(
            "/resources/customObjects/{id}/instances",
            post(create_instance),
        )
        .route(
            "/resources/customObjects/{id}/instances/search",
            get(search_instances),
        )
        .route(
            "/resources/customObjects/{id}/instances/{instance_id}",
            put(update_instance).delete(delete_instance),
        )
        .fallback(not_found)
        // Added after the fallback so unknown paths are authenticated and counted too.
        .layer(from_fn_with_state(fake.clone(), guard));
    resources.merge(admin::routes()).with_state(fake)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

fn is_resource_path(path: &str) -> bool {
    path == "/resources" || path.starts_with("/resources/")
}

/// Wraps every `/resources` call; other paths pass straight through.
async fn guard(State(fake): State<FakeVitally>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !is_resource_path(&path) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| path.clone(), |m| route_template(m.as_str()));
    let response = admit(&fake, &method, &path, req, next).await;
    let status = response.as_ref().map(|r| r.status().as_u16());
    // The Authorization header is deliberately not logged.
    tracing::debug!(%method, %path, ?status, "fake Vitally call");
    fake.calls_mut()
        .record(format!("{method} {template}"), status);
    response.unwrap_or_else(dropped_connection)
}

/// Authenticates, rate-limits and applies faults, then runs the handler. `None`
/// means the connection is to be cut.
async fn admit(
    fake: &FakeVitally,
    method: &Method,
    path: &str,
    req: Request,
    next: Next,
) -> Option<Response> {
    let key = match req.headers().get(AUTHORIZATION) {
        None => {
            return Some(error_response(
                StatusCode::UNAUTHORIZED,
                "missing Authorization header",
            ));
        }
        Some(value) => value.to_str().ok().map(str::to_owned),
    };
    let Some(key) = key.filter(|key| fake.accepts(key)) else {
        return Some(error_response(StatusCode::UNAUTHORIZED, "invalid API key"));
    };

    let now = Instant::now();
    let admitted = fake.limiter().admit(&key, now);
    let quota = match admitted {
        Ok(quota) => quota,
        Err(quota) => return Some(too_many_requests(quota)),
    };
    let action = fake.faults().take(method.as_str(), path, now);
    let mut response = match action {
        None => next.run(req).await,
        Some(Action::Latency(delay)) => {
            tokio::time::sleep(delay).await;
            next.run(req).await
        }
        Some(Action::AnswerLate(delay)) => {
            // Applied now; a client that gave up before `delay` never sees the answer.
            let response = next.run(req).await;
            tokio::time::sleep(delay).await;
            response
        }
        Some(Action::Status(429)) => {
            // As if the window were full, but freeing soon, so a client that honours
            // RateLimit-Reset retries promptly.
            return Some(too_many_requests(Quota {
                remaining: 0,
                reset: std::time::Duration::from_secs(1),
                ..quota
            }));
        }
        Some(Action::Status(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error_response(status, &format!("injected fault: {status}"))
        }
        Some(Action::Drop) => return None,
    };
    quota.apply(response.headers_mut());
    Some(response)
}

fn too_many_requests(quota: Quota) -> Response {
    let mut response = error_response(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    quota.apply(response.headers_mut());
    response
}

/// A response whose body fails before its first byte: hyper then closes the
/// connection without flushing the buffered head, so the client sees a transport
/// error rather than a status.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(std::future::ready(Err::<Bytes, _>(
        io::Error::other("injected fault: connection dropped"),
    )));
    Response::new(Body::from_stream(failing))
}

// --- organizations ---

async fn list_organizations(
    State(fake): State<FakeVitally>,
    params: Params,
) -> ApiResult<Page<Organization>> {
    let page = PageRequest::parse(&params)?;
    Ok(Json(fake.store().list_organizations(&page)))
}

async fn get_organization(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
) -> ApiResult<Organization> {
    fake.store().organization(&id).map(Json)
}

async fn create_organization(
    State(fake): State<FakeVitally>,
    JsonBody(seed): JsonBody<OrganizationSeed>,
) -> ApiResult<Organization> {
    // Over HTTP the fake assigns ids; only fixtures may choose them.
    let seed = OrganizationSeed { id: None, ..seed };
    fake.store().create_organization(seed, now()).map(Json)
}

async fn update_organization(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<OrganizationPatch>,
) -> ApiResult<Organization> {
    fake.store()
        .update_organization(&id, patch, now())
        .map(Json)
}

async fn organization_accounts(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Page<Account>> {
    let page = PageRequest::parse(&params)?;
    fake.store().organization_accounts(&id, &page).map(Json)
}

// --- accounts ---

async fn list_accounts(
    State(fake): State<FakeVitally>,
    params: Params,
) -> ApiResult<Page<Account>> {
    let page = PageRequest::parse(&params)?;
    Ok(Json(fake.store().list_accounts(&page)))
}

async fn get_account(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
) -> ApiResult<Account> {
    fake.store().account(&id).map(Json)
}

async fn create_account(
    State(fake): State<FakeVitally>,
    JsonBody(seed): JsonBody<AccountSeed>,
) -> ApiResult<Account> {
    let seed = AccountSeed { id: None, ..seed };
    fake.store().create_account(seed, now()).map(Json)
}

async fn update_account(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<AccountPatch>,
) -> ApiResult<Account> {
    fake.store().update_account(&id, patch, now()).map(Json)
}

async fn account_users(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Page<User>> {
    let page = PageRequest::parse(&params)?;
    fake.store().account_users(&id, &page).map(Json)
}

// --- users ---

async fn search_users(State(fake): State<FakeVitally>, params: Params) -> ApiResult<Page<User>> {
    let query = match params.exactly_one(&["email", "externalId", "emailSubdomain"])? {
        ("email", value) => UserQuery::Email(value),
        ("externalId", value) => UserQuery::ExternalId(value),
        (_, value) => UserQuery::EmailDomain(value),
    };
    Ok(Json(Page {
        results: fake.store().search_users(query),
        next: None,
    }))
}

/// Creates a user. A POST with the externalId of an existing user updates that user
/// instead (name/email when given, account and organization lists replaced, traits
/// merged) and also answers 200, so a client that creates twice is not failed but
/// the test can see a single user.
async fn create_user(
    State(fake): State<FakeVitally>,
    JsonBody(seed): JsonBody<UserSeed>,
) -> ApiResult<User> {
    let seed = UserSeed { id: None, ..seed };
    fake.store()
        .upsert_user(seed, now(), crate::store::Links::Required)
        .map(|(user, _)| Json(user))
}

async fn update_user(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<UserPatch>,
) -> ApiResult<User> {
    fake.store().update_user(&id, patch, now()).map(Json)
}

// --- custom objects and fields ---

#[derive(Debug, Deserialize)]
struct FieldBody {
    #[serde(default)]
    label: String,
    #[serde(rename = "type")]
    field_type: FieldType,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CustomObjectBody {
    name: String,
    label: Option<String>,
    custom_fields: Vec<FieldBody>,
}

fn field_seeds(fields: Vec<FieldBody>) -> Result<Vec<FieldSeed>, ApiError> {
    fields
        .into_iter()
        .map(|field| match field.model.as_deref() {
            None | Some("CustomObject") => Ok(FieldSeed {
                label: field.label,
                field_type: field.field_type,
            }),
            Some(other) => Err(bad_request(format!(
                "custom field model must be \"CustomObject\", got {other:?}"
            ))),
        })
        .collect()
}

async fn list_custom_objects(
    State(fake): State<FakeVitally>,
    params: Params,
) -> ApiResult<Page<CustomObject>> {
    let page = PageRequest::parse(&params)?;
    Ok(Json(fake.store().list_custom_objects(&page)))
}

async fn create_custom_object(
    State(fake): State<FakeVitally>,
    JsonBody(body): JsonBody<CustomObjectBody>,
) -> ApiResult<CustomObject> {
    let seed = CustomObjectSeed {
        id: None,
        name: body.name,
        label: body.label,
        fields: field_seeds(body.custom_fields)?,
    };
    fake.store().create_custom_object(seed, now()).map(Json)
}

async fn update_custom_object(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CustomObjectBody>,
) -> ApiResult<CustomObject> {
    let fields = field_seeds(body.custom_fields)?;
    fake.store()
        .update_custom_object(&id, body.label, fields, now())
        .map(Json)
}

/// Models Vitally accepts besides `customObjects`; the fake defines no custom
/// fields on them.
const OTHER_FIELD_MODELS: [&str; 8] = [
    "users",
    "accounts",
    "organizations",
    "tasks",
    "notes",
    "projects",
    "conversations",
    "team",
];

/// A bare JSON array, not a `results` envelope, as Vitally returns it.
async fn list_custom_fields(
    State(fake): State<FakeVitally>,
    params: Params,
) -> ApiResult<Vec<CustomField>> {
    match params.get("model") {
        Some("customObjects") => {}
        Some(model) if OTHER_FIELD_MODELS.contains(&model) => return Ok(Json(Vec::new())),
        Some(model) => return Err(bad_request(format!("unknown model {model:?}"))),
        None => return Err(bad_request("model is required")),
    }
    let id = params
        .get("customObjectId")
        .ok_or_else(|| bad_request("customObjectId is required when model=customObjects"))?;
    fake.store().custom_fields(id).map(Json)
}

// --- custom object instances ---

async fn search_instances(
    State(fake): State<FakeVitally>,
    Path(object_id): Path<String>,
    params: Params,
) -> ApiResult<Page<Instance>> {
    let query = match params.exactly_one(&["externalId", "id", "customerId", "organizationId"])? {
        ("externalId", value) => InstanceQuery::ExternalId(value),
        ("id", value) => InstanceQuery::Id(value),
        ("customerId", value) => InstanceQuery::CustomerId(value),
        (_, value) => InstanceQuery::OrganizationId(value),
    };
    // Search lags writes: instances younger than the lag are not found yet.
    let lag = fake.faults().search_lag();
    let visible_before = lag.map(|lag| now() - chrono::Duration::from_std(lag).unwrap_or_default());
    let mut results = fake.store().search_instances(&object_id, query)?;
    if let Some(cutoff) = visible_before {
        results.retain(|i| i.created_at <= cutoff);
    }
    Ok(Json(Page {
        results,
        next: None,
    }))
}

async fn create_instance(
    State(fake): State<FakeVitally>,
    Path(object_id): Path<String>,
    JsonBody(seed): JsonBody<InstanceSeed>,
) -> ApiResult<Instance> {
    let seed = InstanceSeed {
        id: None,
        custom_object_id: object_id.clone(),
        ..seed
    };
    fake.store()
        .create_instance(&object_id, seed, now())
        .map(Json)
}

async fn update_instance(
    State(fake): State<FakeVitally>,
    Path((object_id, instance_id)): Path<(String, String)>,
    JsonBody(patch): JsonBody<InstancePatch>,
) -> ApiResult<Instance> {
    fake.store()
        .update_instance(&object_id, &instance_id, patch, now())
        .map(Json)
}

async fn delete_instance(
    State(fake): State<FakeVitally>,
    Path((object_id, instance_id)): Path<(String, String)>,
) -> ApiResult<Instance> {
    fake.store()
        .delete_instance(&object_id, &instance_id)
        .map(Json)
}
