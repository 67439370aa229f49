//! `batch`: a list of commands, one reply each, in order.
//!
//! Commands run one after the other, in order, so a batch means what it
//! says (a push after a kick finds the user kicked). A run of consecutive
//! single-user pushes without an idempotency key is stored with one
//! StoreMany call and routed as one job. A failed command answers its own
//! error and the others still run; only a bad batch as a whole (bad JSON, no
//! or too many commands, over the app's rate) fails the call.

use std::sync::Arc;

use pushgrid_proto::cluster::{App, StoreItem};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::methods::{Method, call_command};
use crate::push;
use crate::state::{ApiState, Params, rate_limit_batch};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchParams {
    commands: Vec<Command>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    method: String,
    #[serde(default)]
    params: Value,
}

/// Single-user pushes waiting to be stored together: (command index, item).
type PushRun = Vec<(usize, StoreItem)>;

pub(crate) async fn batch(
    state: &Arc<ApiState>,
    app: &App,
    params: BatchParams,
) -> Result<Value, ApiError> {
    let count = params.commands.len();
    if count == 0 {
        return Err(ApiError::bad_request(
            "commands: at least one command is required",
        ));
    }
    let max = state.config.max_batch_commands;
    if count > max {
        return Err(ApiError::bad_request(format!(
            "commands: {count} commands exceed the limit of {max} per batch"
        )));
    }
    rate_limit_batch(state, app, count as u32)?;
    metrics::counter!("pushgrid_center_batch_commands_total").increment(count as u64);

    let mut replies: Vec<Value> = vec![Value::Null; count];
    let mut run: PushRun = Vec::new();
    for (index, command) in params.commands.into_iter().enumerate() {
        let prefix = format!("commands[{index}]");
        let Some(method) = Method::from_name(&command.method) else {
            let error =
                ApiError::bad_request(format!("method: unknown method {:?}", command.method));
            replies[index] = error.within(&prefix).to_json();
            continue;
        };
        if method == Method::Push {
            let checked = Params::Value(command.params)
                .parse()
                .and_then(|params| push::validate(state, params));
            let push = match checked {
                Ok(push) => push,
                Err(error) => {
                    replies[index] = error.within(&prefix).to_json();
                    continue;
                }
            };
            if let Some(item) = push.single_item(app) {
                run.push((index, item));
                continue;
            }
            store_run(state, &mut run, &mut replies).await;
            replies[index] = reply(push::push_valid(state, app, push).await, &prefix);
            continue;
        }
        store_run(state, &mut run, &mut replies).await;
        let answered = call_command(state, app, method, Params::Value(command.params)).await;
        replies[index] = reply(answered, &prefix);
    }
    store_run(state, &mut run, &mut replies).await;
    Ok(json!({ "replies": replies }))
}

fn reply(answered: Result<Value, ApiError>, prefix: &str) -> Value {
    match answered {
        Ok(result) => json!({ "result": result }),
        Err(error) => error.within(prefix).to_json(),
    }
}

/// Stores the waiting run of single-user pushes with one call and answers each.
async fn store_run(state: &Arc<ApiState>, run: &mut PushRun, replies: &mut [Value]) {
    if run.is_empty() {
        return;
    }
    let (indexes, items): (Vec<usize>, Vec<StoreItem>) = std::mem::take(run).into_iter().unzip();
    match push::push_items(state, items).await {
        Ok(messages) => {
            for (index, message) in indexes.into_iter().zip(messages) {
                replies[index] =
                    json!({ "result": push::answer(std::slice::from_ref(&message), false) });
            }
        }
        Err(error) => {
            for index in indexes {
                replies[index] = error
                    .clone()
                    .within(&format!("commands[{index}]"))
                    .to_json();
            }
        }
    }
}
