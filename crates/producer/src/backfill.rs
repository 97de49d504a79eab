//! Opt-in backfill: an export of historical snapshots (NDJSON, one event per line) goes
//! onto the backfill lane, past the product's forward-only rule by this explicit choice.
//!
//! The export is read whole and checked line by line (a bad line is refused and named;
//! the others go on); a request that appears more than once keeps its newest version.
//! The job is identified by the export's content, so importing the same export again —
//! after a crash, say — resumes where the confirmed publishing stopped; a snapshot
//! published twice is harmless (the version guard applies each version once).

use std::collections::BTreeMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
};
use futures_util::future::try_join_all;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use thena_broker::{PublishError, Publisher};
use thena_events::{Limits, RequestChanged, parse_event};
use thena_store::{
    Db, DbError,
    backfill::{self, NewJob, Progress},
};

use crate::{app::AppState, error::ApiError};

/// Refused lines listed in an answer; the rest are counted.
pub const PROBLEMS_SHOWN: usize = 100;
/// Snapshots published (and confirmed) between two progress marks.
const CHUNK: usize = 64;

/// One refused line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    /// 1-based line number.
    pub line: usize,
    pub problem: String,
}

/// An export, read: its requests at their newest versions in request-id order (the
/// publishing order a rerun resumes in), and what was refused.
#[derive(Debug, Clone)]
pub struct Export {
    pub snapshots: Vec<RequestChanged>,
    pub rejected: usize,
    /// The first [`PROBLEMS_SHOWN`] refused lines.
    pub problems: Vec<LineProblem>,
    pub content_hash: String,
}

/// Reads an export for `workspace`: every non-blank line must be a valid event of that
/// workspace.
pub fn read_export(workspace: &str, bytes: &[u8], limits: &Limits) -> Export {
    let mut newest: BTreeMap<u64, RequestChanged> = BTreeMap::new();
    let mut rejected = 0;
    let mut problems = Vec::new();
    let mut refuse = |line: usize, problem: String| {
        rejected += 1;
        if problems.len() < PROBLEMS_SHOWN {
            problems.push(LineProblem { line, problem });
        }
    };
    for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_event(line, limits) {
            Ok(event) if event.workspace_id != workspace => refuse(
                index + 1,
                format!(
                    "workspace_id: {:?} is not the workspace being backfilled",
                    event.workspace_id
                ),
            ),
            Ok(event) => {
                let keep = newest
                    .get(&event.request.id)
                    .is_none_or(|kept| kept.request.version < event.request.version);
                if keep {
                    newest.insert(event.request.id, event);
                }
            }
            Err(error) => refuse(index + 1, error.to_string()),
        }
    }
    Export {
        snapshots: newest.into_values().collect(),
        rejected,
        problems,
        content_hash: format!("{:x}", Sha256::digest(bytes)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot publish to the backfill lane: {0}")]
    Publish(#[from] PublishError),
}

/// What a run did: the job (new or resumed) and how many snapshots this run published.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub job: Progress,
    pub resumed: bool,
    pub published_now: u64,
}

/// Opens (or resumes) the job of `export` and publishes what is not confirmed yet onto
/// the backfill lane, marking progress after every confirmed chunk; `on_progress` is
/// told how many are on the broker so far.
pub async fn run(
    db: &Db,
    publisher: &Publisher,
    workspace: &str,
    source: &str,
    actor: &str,
    export: &Export,
    mut on_progress: impl FnMut(u64),
) -> Result<Started, BackfillError> {
    let items: Vec<(u64, u64)> = export
        .snapshots
        .iter()
        .map(|e| (e.request.id, e.request.version))
        .collect();
    let (job, resumed) = backfill::open(
        db,
        NewJob {
            id: uuid::Uuid::now_v7().to_string(),
            workspace_id: workspace,
            source,
            content_hash: &export.content_hash,
            actor,
            items: &items,
            rejected: export.rejected as u32,
        },
    )
    .await?;
    let start = job.published as usize;
    let mut published = start;
    for chunk in export.snapshots[start.min(export.snapshots.len())..].chunks(CHUNK) {
        try_join_all(chunk.iter().map(|e| publisher.publish_backfill(e, &job.id))).await?;
        published += chunk.len();
        backfill::mark_published(db, &job.id, published as u64).await?;
        on_progress(published as u64);
    }
    backfill::finish_publishing(db, &job.id).await?;
    let job = backfill::progress(db, workspace, &job.id)
        .await?
        .unwrap_or(job);
    Ok(Started {
        job,
        resumed,
        published_now: (published - start) as u64,
    })
}

/// Largest export `POST /v1/integrations/{ws}/backfill` takes in one body (it is read
/// whole); a bigger one goes in several posts, or through the CLI.
pub const BODY_LIMIT: usize = 16 * 1024 * 1024;

/// `POST /v1/integrations/{workspace_id}/backfill` (NDJSON): opens or resumes the job of
/// this export and answers 202 once every snapshot is on the broker.
pub(crate) async fn post(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match state.integrations().get(&workspace_id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("workspace {workspace_id} is not connected: connect it first"),
            ));
        }
        Err(error) => return Err(unavailable(&error.to_string())),
    }
    let export = read_export(&workspace_id, &body, state.limits());
    drop(body);
    if export.snapshots.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("no valid event of workspace {workspace_id} in the body"),
        )
        .with("rejected", export.rejected)
        .with("problems", json!(export.problems)));
    }
    let db = state.integrations().db();
    let started = run(
        db,
        state.publisher(),
        &workspace_id,
        "admin-api",
        "admin-api",
        &export,
        |_| {},
    )
    .await
    .map_err(|error| unavailable(&error.to_string()))?;
    tracing::info!(
        target: "thena::audit",
        actor = "admin-api",
        workspace = %workspace_id,
        job = %started.job.id,
        requests = started.job.requests,
        published = started.published_now,
        resumed = started.resumed,
        "backfill"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "job": backfill::view(&started.job),
            "resumed": started.resumed,
            "published_now": started.published_now,
            "rejected": export.rejected,
            "problems": export.problems,
        })),
    ))
}

/// `GET /v1/integrations/{workspace_id}/backfill`: the workspace's jobs, newest first.
pub(crate) async fn list(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = backfill::list(state.integrations().db(), &workspace_id)
        .await
        .map_err(|error| unavailable(&error.to_string()))?;
    let jobs: Vec<Value> = jobs.iter().map(backfill::view).collect();
    Ok(Json(json!({ "workspace_id": workspace_id, "jobs": jobs })))
}

/// `GET /v1/integrations/{workspace_id}/backfill/{job}`: one job's progress.
pub(crate) async fn show(
    State(state): State<AppState>,
    Path((workspace_id, job)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    match backfill::progress(state.integrations().db(), &workspace_id, &job)
        .await
        .map_err(|error| unavailable(&error.to_string()))?
    {
        Some(progress) => Ok(Json(backfill::view(&progress))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no backfill {job} of workspace {workspace_id}"),
        )),
    }
}

fn unavailable(error: &str) -> ApiError {
    tracing::error!(error, "backfill failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "backfill store or broker unavailable",
    )
    .retry_later()
}

#[cfg(test)]
mod tests {
    use thena_events::sample;

    use super::*;

    fn line(ws: &str, id: u64, version: u64) -> String {
        serde_json::to_string(&sample::event(ws, id, version, Some("a@acme.com"))).unwrap()
    }

    #[test]
    fn an_export_keeps_each_requests_newest_version_in_request_order() {
        let text = [
            line("W1", 3, 1),
            String::new(),
            line("W1", 1, 2),
            line("W1", 3, 4),
            line("W1", 1, 1),
        ]
        .join("\n");
        let export = read_export("W1", text.as_bytes(), &Limits::default());
        let got: Vec<(u64, u64)> = export
            .snapshots
            .iter()
            .map(|e| (e.request.id, e.request.version))
            .collect();
        assert_eq!(got, [(1, 2), (3, 4)]);
        assert_eq!(export.rejected, 0);
        assert_eq!(export.content_hash.len(), 64);
    }

    #[test]
    fn bad_lines_and_other_workspaces_are_refused_by_line_and_the_rest_kept() {
        let text = [
            line("W1", 1, 1),
            "{not json".to_string(),
            line("W2", 2, 1),
            line("W1", 3, 1),
        ]
        .join("\n");
        let export = read_export("W1", text.as_bytes(), &Limits::default());
        assert_eq!(export.snapshots.len(), 2);
        assert_eq!(export.rejected, 2);
        assert_eq!(export.problems[0].line, 2);
        assert_eq!(export.problems[1].line, 3);
        assert!(
            export.problems[1].problem.contains("W2"),
            "{:?}",
            export.problems
        );
    }

    #[test]
    fn refused_lines_listed_are_bounded_and_the_rest_counted() {
        let text = "x\n".repeat(PROBLEMS_SHOWN + 50);
        let export = read_export("W1", text.as_bytes(), &Limits::default());
        assert_eq!(export.rejected, PROBLEMS_SHOWN + 50);
        assert_eq!(export.problems.len(), PROBLEMS_SHOWN);
    }
}
