"""What `unlearn status` shows: the ledger, the models, their versions, budgets and due dates."""

from __future__ import annotations

import uuid

import psycopg
from rich.console import Console
from rich.table import Table


def show(conn: psycopg.Connection, console: Console, request_id: uuid.UUID | None = None) -> bool:
    """Print the status; False when a named request does not exist."""
    if request_id is not None:
        return _show_request(conn, console, request_id)
    counts = conn.execute("SELECT status, count(*) FROM erasure_requests GROUP BY status ORDER BY status").fetchall()
    summary = ", ".join(f"{status} {count}" for status, count in counts) or "no requests yet"
    console.print(f"[bold]Erasure ledger:[/bold] {summary}")
    overdue = conn.execute(
        "SELECT count(*) FROM erasure_requests WHERE status IN ('received', 'rows_deleted') AND due_at < now()"
    ).fetchone()[0]
    if overdue:
        console.print(f"[bold red]{overdue} open requests are past their GDPR due date[/bold red]")

    requests = Table(title="Latest requests")
    for column in ("request", "status", "rows", "received", "due", "completed", "models"):
        requests.add_column(column)
    for row in conn.execute(
        "SELECT request_id, status, rows_deleted, received_at, due_at, completed_at, model_versions"
        " FROM erasure_requests ORDER BY received_at DESC LIMIT 15"
    ):
        request, status, rows, received, due, completed, versions = row
        requests.add_row(
            str(request), status, "" if rows is None else str(rows), f"{received:%Y-%m-%d %H:%M:%S}",
            f"{due:%Y-%m-%d}", "" if completed is None else f"{completed:%H:%M:%S}",
            ", ".join(f"{v['model']} v{v['version']}" for v in versions),
        )
    console.print(requests)

    models = Table(title="Models")
    for column in ("model", "method", "dataset", "serving", "versions", "budget left", "holdout acc", "pending"):
        models.add_column(column)
    for row in conn.execute(
        "SELECT m.name, m.method, m.dataset, m.current_version,"
        " (SELECT count(*) FROM model_versions v WHERE v.model = m.name),"
        " cv.deletion_budget_remaining, cv.metrics ->> 'holdout_accuracy',"
        " (SELECT count(*) FROM pending_unlearning p WHERE p.model = m.name)"
        " FROM models m LEFT JOIN model_versions cv ON cv.model = m.name AND cv.version = m.current_version"
        " ORDER BY m.name"
    ):
        name, method, dataset, current, versions, budget, accuracy, pending = row
        models.add_row(
            name, method, dataset, f"v{current}", str(versions),
            "" if budget is None else f"{budget:.1f}",
            "" if accuracy is None else f"{float(accuracy):.3f}", str(pending),
        )
    console.print(models)
    return True


def _show_request(conn: psycopg.Connection, console: Console, request_id: uuid.UUID) -> bool:
    row = conn.execute(
        "SELECT status, rows_deleted, received_at, due_at, completed_at, attempts, last_error, receipt"
        " FROM erasure_requests WHERE request_id = %s",
        (request_id,),
    ).fetchone()
    if row is None:
        return False
    status, rows, received, due, completed, attempts, error, receipt = row
    console.print(f"[bold]{request_id}[/bold]: {status}; rows deleted {rows}; received {received:%Y-%m-%d %H:%M:%S};"
                  f" due {due:%Y-%m-%d}; completed {completed or '-'}; attempts {attempts}")
    if error:
        console.print(f"last error: {error}")
    if receipt:
        console.print_json(data=receipt)
    return True
