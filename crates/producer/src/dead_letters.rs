//! The dead-letter admin API: the parked set, fleet-wide under `/v1/dead-letters…` and one
//! workspace's under `/v1/integrations/{workspace_id}/dead-letters…` (what a
//! workspace-scoped token can reach). Handlers only translate HTTP to
//! `thena_replayer::dlq` and back; the CLI and the console call the same functions.

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;
use thena_replayer::dlq::{DlqError, DlqFilter, PurgeOptions, ReplayOptions};
use thena_runtime::config::parse_duration;
use thena_store::dead_letters::State as LetterState;

use crate::{
    app::AppState,
    error::{ApiError, bad_json},
};

/// Who acts through this API when the body names no one, in the audit trail.
const ACTOR: &str = "admin-api";

/// `GET …/dead-letters`: filters as query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    workspace: Option<String>,
    reason: Option<String>,
    request_id: Option<u64>,
    older_than: Option<String>,
    younger_than: Option<String>,
    /// Comma-separated dead letter ids.
    ids: Option<String>,
    state: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

/// The filter of a replay or purge body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterBody {
    workspace: Option<String>,
    reason: Option<String>,
    request_id: Option<u64>,
    older_than: Option<String>,
    younger_than: Option<String>,
    #[serde(default)]
    ids: Vec<i64>,
}

/// `POST …/dead-letters/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayBody {
    #[serde(default)]
    filter: FilterBody,
    #[serde(default)]
    dry_run: bool,
    rate_per_sec: Option<f64>,
    actor: Option<String>,
    #[serde(default)]
    why: String,
}

/// `POST …/dead-letters/purge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeBody {
    #[serde(default)]
    filter: FilterBody,
    /// Must be `true`: without it the answer is 409 with how many would be purged.
    #[serde(default)]
    confirm: bool,
    actor: Option<String>,
    #[serde(default)]
    why: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn age(name: &str, value: Option<String>) -> Result<Option<std::time::Duration>, ApiError> {
    value
        .map(|text| parse_duration(&text).map_err(|e| bad_request(format!("{name}: {e}"))))
        .transpose()
}

/// The workspace a request is about: the path's, which a filter may repeat but not change.
fn scoped(path: Option<&str>, asked: Option<String>) -> Result<Option<String>, ApiError> {
    match (path, asked) {
        (Some(path), Some(asked)) if path != asked => Err(bad_request(format!(
            "the path is about workspace {path}; the filter names {asked}"
        ))),
        (Some(path), _) => Ok(Some(path.to_owned())),
        (None, asked) => Ok(asked),
    }
}

impl ListQuery {
    fn filter(self, workspace: Option<&str>) -> Result<(DlqFilter, Option<i64>, i64), ApiError> {
        let ids = match self.ids.as_deref() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|id| id.trim().parse::<i64>())
                .collect::<Result<_, _>>()
                .map_err(|_| bad_request("ids: comma-separated dead letter ids"))?,
        };
        let state = match self.state.as_deref() {
            None => LetterState::Parked,
            Some(state) => state.parse().map_err(bad_request)?,
        };
        let filter = DlqFilter {
            workspace: scoped(workspace, self.workspace)?,
            reason: self.reason,
            request_id: self.request_id,
            older_than: age("older_than", self.older_than)?,
            younger_than: age("younger_than", self.younger_than)?,
            ids,
            state,
        };
        Ok((filter, self.after, self.limit.unwrap_or(50)))
    }
}

impl FilterBody {
    fn filter(self, workspace: Option<&str>) -> Result<DlqFilter, ApiError> {
        Ok(DlqFilter {
            workspace: scoped(workspace, self.workspace)?,
            reason: self.reason,
            request_id: self.request_id,
            older_than: age("filter.older_than", self.older_than)?,
            younger_than: age("filter.younger_than", self.younger_than)?,
            ids: self.ids,
            state: LetterState::Parked,
        })
    }
}

/// Every dead-letter failure, classified once.
pub(crate) fn dlq_error(error: DlqError) -> ApiError {
    let message = error.to_string();
    match error {
        DlqError::BadFilter(_) | DlqError::BadOption(_) | DlqError::TransitIsReadOnly(_) => {
            bad_request(message)
        }
        DlqError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, message),
        DlqError::ConfirmRequired { matched } => ApiError::new(
            StatusCode::CONFLICT,
            format!("{message}: send \"confirm\": true"),
        )
        .with("matched", matched),
        DlqError::Db(_) | DlqError::Broker(_) | DlqError::Amqp { .. } => {
            // Our insides: logged, not returned.
            tracing::error!(error = %message, "dead-letter operation failed");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "dead letters unavailable").retry_later()
        }
    }
}

async fn list(
    state: &AppState,
    workspace: Option<&str>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let (filter, after, limit) = query.filter(workspace)?;
    let page = state
        .dlq()
        .list(&filter, after, limit)
        .await
        .map_err(dlq_error)?;
    Ok(Json(page).into_response())
}

async fn show(state: &AppState, workspace: Option<&str>, id: &str) -> Result<Response, ApiError> {
    let shown = state.dlq().show(id, workspace).await.map_err(dlq_error)?;
    Ok(Json(shown).into_response())
}

/// A dry run answers the count at once; a replay answers 202 with its audit line and runs
/// in the background at its rate (the audit line shows its progress).
async fn replay(
    state: &AppState,
    workspace: Option<&str>,
    body: Result<Json<ReplayBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad_json(&e))?;
    let filter = body.filter.filter(workspace)?;
    let options = ReplayOptions {
        dry_run: body.dry_run,
        rate_per_sec: body.rate_per_sec,
        actor: body.actor.unwrap_or_else(|| ACTOR.to_owned()),
        why: body.why,
    };
    let dlq = state.dlq().clone();
    let job = dlq
        .prepare_replay(&filter, &options)
        .await
        .map_err(dlq_error)?;
    let answer = json!({
        "audit_id": job.audit_id,
        "dry_run": job.dry_run,
        "matched": job.matched,
        "message": if job.dry_run {
            format!("{} message(s) would be replayed", job.matched)
        } else {
            format!("replaying {} message(s)", job.matched)
        },
    });
    let (Some(audit), false) = (job.audit_id, job.dry_run) else {
        return Ok(Json(answer).into_response());
    };
    let publisher = state.publisher().clone();
    tokio::spawn(async move {
        match dlq.replay(&publisher, job, |_| {}).await {
            Ok(report) => tracing::info!(
                audit,
                replayed = report.replayed,
                failed = report.failed.len(),
                "dead-letter replay finished"
            ),
            Err(error) => tracing::error!(audit, %error, "dead-letter replay stopped"),
        }
    });
    let location = match workspace {
        Some(ws) => format!("/v1/integrations/{ws}/dead-letters/audit/{audit}"),
        None => format!("/v1/dead-letters/audit/{audit}"),
    };
    let mut response = (StatusCode::ACCEPTED, Json(answer)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn purge(
    state: &AppState,
    workspace: Option<&str>,
    body: Result<Json<PurgeBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad_json(&e))?;
    let filter = body.filter.filter(workspace)?;
    let options = PurgeOptions {
        confirm: body.confirm,
        actor: body.actor.unwrap_or_else(|| ACTOR.to_owned()),
        why: body.why,
    };
    let report = state
        .dlq()
        .purge(&filter, &options)
        .await
        .map_err(dlq_error)?;
    Ok(Json(report).into_response())
}

async fn audit(
    state: &AppState,
    workspace: Option<&str>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let page = state
        .dlq()
        .audit(workspace, query.before, query.limit.unwrap_or(50))
        .await
        .map_err(dlq_error)?;
    Ok(Json(page).into_response())
}

async fn audit_entry(
    state: &AppState,
    workspace: Option<&str>,
    id: i64,
) -> Result<Response, ApiError> {
    let entry = state
        .dlq()
        .audit_entry(id, workspace)
        .await
        .map_err(dlq_error)?;
    Ok(Json(entry).into_response())
}

/// The routes: each operation fleet-wide, and for one workspace.
pub(crate) mod routes {
    use super::*;

    type Answer = Result<Response, ApiError>;

    pub(crate) async fn list_all(
        State(state): State<AppState>,
        query: Result<Query<ListQuery>, QueryRejection>,
    ) -> Answer {
        list(&state, None, query).await
    }

    pub(crate) async fn list_of(
        State(state): State<AppState>,
        Path(workspace): Path<String>,
        query: Result<Query<ListQuery>, QueryRejection>,
    ) -> Answer {
        list(&state, Some(&workspace), query).await
    }

    pub(crate) async fn show_any(State(state): State<AppState>, Path(id): Path<String>) -> Answer {
        show(&state, None, &id).await
    }

    pub(crate) async fn show_of(
        State(state): State<AppState>,
        Path((workspace, id)): Path<(String, String)>,
    ) -> Answer {
        show(&state, Some(&workspace), &id).await
    }

    pub(crate) async fn replay_all(
        State(state): State<AppState>,
        body: Result<Json<ReplayBody>, JsonRejection>,
    ) -> Answer {
        replay(&state, None, body).await
    }

    pub(crate) async fn replay_of(
        State(state): State<AppState>,
        Path(workspace): Path<String>,
        body: Result<Json<ReplayBody>, JsonRejection>,
    ) -> Answer {
        replay(&state, Some(&workspace), body).await
    }

    pub(crate) async fn purge_all(
        State(state): State<AppState>,
        body: Result<Json<PurgeBody>, JsonRejection>,
    ) -> Answer {
        purge(&state, None, body).await
    }

    pub(crate) async fn purge_of(
        State(state): State<AppState>,
        Path(workspace): Path<String>,
        body: Result<Json<PurgeBody>, JsonRejection>,
    ) -> Answer {
        purge(&state, Some(&workspace), body).await
    }

    pub(crate) async fn audit_all(
        State(state): State<AppState>,
        query: Result<Query<AuditQuery>, QueryRejection>,
    ) -> Answer {
        audit(&state, None, query).await
    }

    pub(crate) async fn audit_of(
        State(state): State<AppState>,
        Path(workspace): Path<String>,
        query: Result<Query<AuditQuery>, QueryRejection>,
    ) -> Answer {
        audit(&state, Some(&workspace), query).await
    }

    pub(crate) async fn audit_entry_any(
        State(state): State<AppState>,
        Path(id): Path<i64>,
    ) -> Answer {
        audit_entry(&state, None, id).await
    }

    pub(crate) async fn audit_entry_of(
        State(state): State<AppState>,
        Path((workspace, id)): Path<(String, i64)>,
    ) -> Answer {
        audit_entry(&state, Some(&workspace), id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_route_keeps_its_workspace() {
        assert_eq!(scoped(Some("T1"), None).unwrap().as_deref(), Some("T1"));
        assert_eq!(
            scoped(Some("T1"), Some("T1".into())).unwrap().as_deref(),
            Some("T1")
        );
        assert!(scoped(Some("T1"), Some("T2".into())).is_err());
        assert_eq!(
            scoped(None, Some("T2".into())).unwrap().as_deref(),
            Some("T2")
        );
        assert_eq!(scoped(None, None).unwrap(), None);
    }

    #[test]
    fn query_filters_read_ages_ids_and_states_and_refuse_nonsense() {
        let query = ListQuery {
            older_than: Some("15m".into()),
            ids: Some("3, 5".into()),
            state: Some("replayed".into()),
            ..ListQuery::default()
        };
        let (filter, after, limit) = query.filter(Some("T1")).unwrap();
        assert_eq!(filter.older_than, Some(std::time::Duration::from_secs(900)));
        assert_eq!(filter.ids, vec![3, 5]);
        assert_eq!(filter.state, LetterState::Replayed);
        assert_eq!(filter.workspace.as_deref(), Some("T1"));
        assert_eq!((after, limit), (None, 50));
        for bad in [
            ListQuery {
                ids: Some("3,x".into()),
                ..ListQuery::default()
            },
            ListQuery {
                state: Some("lost".into()),
                ..ListQuery::default()
            },
            ListQuery {
                younger_than: Some("soon".into()),
                ..ListQuery::default()
            },
        ] {
            assert!(bad.filter(None).is_err());
        }
    }

    #[test]
    fn dead_letter_errors_map_to_statuses() {
        let status = |e: DlqError| dlq_error(e).into_response().status();
        assert_eq!(
            status(DlqError::BadFilter("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(DlqError::NotFound("7".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(DlqError::ConfirmRequired { matched: 3 }),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(DlqError::Db(thena_store::DbError::Unavailable(
                "down".into()
            ))),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
