"""``fct-registry ui`` and ``serve``: the MLflow UI over the registry, the HTTP search service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli import index_options as opt
from fct_registry.cli.common import Project, console
from fct_registry.serving import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES
from fct_registry.serving.server import serve
from fct_registry.usecases import gallery_index
from fct_registry.usecases import ui as usecase

app = typer.Typer()



@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Run the MLflow UI over the registry (runs, models, tags, aliases) until Ctrl-C."""
    registry = ctx.obj.registry()
    console().print(f"MLflow UI on http://{host}:{port} over {registry.tracking_uri} (Ctrl-C stops it)",
                    markup=False)
    raise typer.Exit(usecase.run_mlflow_ui(registry, host, port))


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest /search request body, bytes.")]
    = DEFAULT_MAX_UPLOAD_BYTES,
    max_k: Annotated[int, typer.Option(help="Largest k a query may ask for.")] = DEFAULT_MAX_K,
    admin_token_file: Annotated[Path | None, typer.Option(
        help=f"File holding the token POST /reload requires (Authorization: Bearer); else ${usecase.ADMIN_TOKEN_ENV}.",
        show_default=False)] = None,
    index: opt.IndexKind = None,
    nlist: opt.Nlist = None,
    nprobe: opt.Nprobe = None,
    pq_m: opt.PqM = None,
    pq_nbits: opt.PqNbits = None,
    hnsw_m: opt.HnswM = None,
    ef_construction: opt.EfConstruction = None,
    ef_search: opt.EfSearch = None,
    train_size: opt.TrainSize = None,
) -> None:
    """Serve gallery search over HTTP with the champion backbone until Ctrl-C.

    Refuses to start unless a set under --sets-root was made by the champion (upgrade the gallery first).

    Refuses a --host other than loopback without an admin token (--admin-token-file or FCT_REGISTRY_ADMIN_TOKEN).

    POST /reload after a promote and upgrade swaps in the new champion and its gallery.

    Searches with the index of params.yaml's serving: section (ivf by default) or of the options below: an
    approximate index is stored beside the gallery set and built there first when missing (at start and on
    /reload); GET /info shows its recall@10 against exact search.

    With a token set, POST /reload needs the header 'Authorization: Bearer <token>'.
    """
    project: Project = ctx.obj
    token = usecase.admin_token(admin_token_file)
    usecase.require_token_off_loopback(host, token)  # before the registry is opened or anything is loaded
    serving = gallery_index.serving_params(project.root, **opt.overrides(
        index, nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_nbits=pq_nbits, hnsw_m=hnsw_m,
        ef_construction=ef_construction, ef_search=ef_search, train_size=train_size))
    serve(project.registry(), project.sets_root, host, port, project.settings().registry.champion_alias,
          max_upload_bytes, max_k, admin_token=token, serving=serving)
