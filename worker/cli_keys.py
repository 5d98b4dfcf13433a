"""`unlearn keys`: the Ed25519 key that signs what the worker publishes (`worker.signing` does
the work): export its public half, make a new one, check a published event as a third party would."""

from __future__ import annotations

from pathlib import Path

import click

from worker.config import get_settings


@click.group()
def keys() -> None:
    """The Ed25519 keys that sign model versions, manifests and receipts."""


@keys.command("public")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the PEM here (e.g. the file UNLEARN_VERIFY_KEY_FILE names) instead of printing it.")
def keys_public(out: Path | None) -> None:
    """Print the public key that checks the worker's signatures (UNLEARN_SIGNING_KEY_FILE's, or
    the local stack's, created on first use); servers and third parties need nothing else."""
    from worker import signing

    pem = key_or_exit(lambda: signing.signer(get_settings()).public_pem())
    if out is None:
        click.echo(pem.decode("ascii"), nl=False)
    else:
        out.write_bytes(pem)
        click.echo(f"wrote {out}")


@keys.command("create")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_create(path: Path) -> None:
    """Write a new signing key to PATH (mode 0600; never over an existing file) and print its
    public key. Point UNLEARN_SIGNING_KEY_FILE at it (or mount it as a secret)."""
    from worker import signing

    if not signing.create_key_file(path):
        raise click.ClickException(f"{path} exists already; a key is never overwritten")
    click.echo(signing.Signer(signing.load_private_key(path)).public_pem().decode("ascii"), nl=False)


@keys.command("check")
@click.argument("event_file", type=click.File("rb"))
@click.option("--public-key", "public_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="PEM public key(s) to trust (default: UNLEARN_VERIFY_KEY_FILE or the stack's).")
def keys_check(event_file, public_key: Path | None) -> None:
    """Check a published event (a receipt or a model version: the Kafka record's value, as JSON)
    with the public key alone, as a third party can; exits 1 when it does not hold."""
    from worker import events, signing

    settings = get_settings()
    if public_key is not None:
        settings = settings.model_copy(update={"verify_key_file": public_key})
    trusted = key_or_exit(lambda: signing.verifier(settings))
    try:
        event = events.decode(event_file.read(), None)
    except events.InvalidEvent as exc:
        raise click.ClickException(f"not a valid event: {exc}") from None
    checks = [("signature", trusted.check_event(event))]
    if event.type == events.ERASURE_COMPLETED:
        digest_ok = events.receipt_digest(event.data) == event.data["receipt_sha256"]
        checks.append(("receipt_sha256", None if digest_ok else "does not match the receipt"))
    for name, problem in checks:
        click.echo(f"{'ok  ' if problem is None else 'FAIL'} {event.type} {name}: {problem or 'holds'}")
    if any(problem is not None for _, problem in checks):
        raise SystemExit(1)


@keys.command("sign-manifests")
def keys_sign_manifests() -> None:
    """Sign the manifests written before versions were signed (once, after upgrading; where the
    signing key is). Only a manifest whose bytes match the sha256 the database recorded for its
    version is signed; servers refuse an unsigned one they find without an event."""
    from worker import db, signing
    from worker.artifacts import ArtifactIntegrityError, read_manifest, read_manifest_signature

    settings = get_settings()
    key_or_exit(lambda: signing.signer(settings))
    with db.connect(settings.database_url) as conn:
        recorded = conn.execute("SELECT model, version, manifest_sha256 FROM model_versions ORDER BY model, version")
        recorded = recorded.fetchall()
    signed = refused = 0
    for model, version, digest in recorded:
        if read_manifest_signature(settings.artifact_dir, model, version) is not None:
            continue
        try:
            read_manifest(settings.artifact_dir, model, version, digest)
        except (FileNotFoundError, ArtifactIntegrityError) as exc:
            click.echo(f"FAIL {model} v{version}: not signed ({exc.__class__.__name__}: missing or not the recorded bytes)")
            refused += 1
            continue
        signing.sign_manifest(settings, model, version, digest)
        signed += 1
    click.echo(f"signed {signed} manifest(s); {refused} refused")
    if refused:
        raise SystemExit(1)


def key_or_exit(load):
    """`load()`, or a clean exit naming the variable when a key file is missing or unusable."""
    from worker import signing

    try:
        return load()
    except signing.KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
