"""What `unlearn status` shows: the ledger, the models, their versions, budgets and due dates."""

from __future__ import annotations

import uuid

import psycopg
from rich.console import Console
from rich.table import Table


def show(conn: psycopg.Connection, console: Console, request_id: uuid.UUID | None = None,
         overdue: bool = False) -> bool:
    """Print the status; False when a named request does not exist."""
    if request_id is not None:
        return _show_request(conn, console, request_id)
    if overdue:
        _show_overdue(conn, console)
        return True
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
    for column in ("model", "method", "dataset", "status", "serving", "versions", "budget left", "holdout acc",
                   "pending"):
        models.add_column(column)
    for row in conn.execute(
        "SELECT m.name, m.method, m.dataset, m.status, m.failure_code, m.current_version, cv.servable,"
        " (SELECT count(*) FROM model_versions v WHERE v.model = m.name),"
        " cv.deletion_budget_remaining, cv.metrics ->> 'holdout_accuracy',"
        " (SELECT count(*) FROM pending_unlearning p WHERE p.model = m.name)"
        " FROM models m LEFT JOIN model_versions cv ON cv.model = m.name AND cv.version = m.current_version"
        " ORDER BY m.name"
    ):
        name, method, dataset, status, failure, current, servable, versions, budget, accuracy, pending = row
        shown = status if failure is None or status == "serving" else f"[red]{status}[/red] ({failure})"
        models.add_row(
            name, method, dataset, shown, f"v{current}" if servable else f"nothing (v{current} withdrawn)", str(versions),
            "" if budget is None else f"{budget:.1f}",
            "" if accuracy is None else f"{float(accuracy):.3f}", str(pending),
        )
    console.print(models)
    return True


def _show_overdue(conn: psycopg.Connection, console: Console) -> None:
    """Open requests past their due date, oldest first, and those due within a week."""
    table = Table(title="Open requests past or near their GDPR due date")
    for column in ("request", "status", "received", "due", "overdue by", "extended", "waiting for"):
        table.add_column(column)
    rows = conn.execute(
        "SELECT e.request_id, e.status, e.received_at, e.due_at, now() - e.due_at, e.extension IS NOT NULL,"
        " (SELECT string_agg(DISTINCT p.model, ', ') FROM pending_unlearning p WHERE p.request_id = e.request_id)"
        " FROM erasure_requests e WHERE e.status IN ('received', 'rows_deleted')"
        " AND e.due_at < now() + interval '7 days' ORDER BY e.due_at"
    ).fetchall()
    for request, status, received, due, late, extended, waiting in rows:
        overdue = f"[red]{late.days}d {late.seconds // 3600}h[/red]" if late.total_seconds() > 0 else "due soon"
        table.add_row(str(request), status, f"{received:%Y-%m-%d %H:%M}", f"{due:%Y-%m-%d %H:%M}", overdue,
                      "yes" if extended else "", waiting or "")
    console.print(table if rows else "No open request is past or within a week of its due date.")


def _show_request(conn: psycopg.Connection, console: Console, request_id: uuid.UUID) -> bool:
    row = conn.execute(
        "SELECT status, rows_deleted, received_at, due_at, completed_at, attempts, failure_code, extension"
        " FROM erasure_requests WHERE request_id = %s",
        (request_id,),
    ).fetchone()
    if row is None:
        return False
    status, rows, received, due, completed, attempts, failure, extension = row
    console.print(f"[bold]{request_id}[/bold]: {status}; rows deleted {rows}; received {received:%Y-%m-%d %H:%M:%S};"
                  f" due {due:%Y-%m-%d}; completed {completed or '-'}; attempts {attempts}")
    if failure:
        console.print(f"failed: {failure} (re-drive with `unlearn retry --request {request_id}`)")
    if extension:
        console.print(f"deadline extended on {extension['extended_at']}: {extension['reason']}")
    for seq, body in conn.execute(
            "SELECT seq, body FROM receipts WHERE request_id = %s ORDER BY seq", (request_id,)):
        console.print(f"receipt #{seq}:")
        console.print_json(data=body)
    return True
