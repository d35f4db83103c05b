"""``fct-registry fit``: train a forward transformation between two registered backbones and register it."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli.common import LOG_EVERY_S, Project, console, named, progress_bars, row, table
from fct_registry.usecases import fit as usecase

app = typer.Typer()


@app.command()
def fit(
    ctx: typer.Context,
    source: Annotated[str, typer.Option("--from", help="Source backbone: number, label or @alias.")],
    target: Annotated[str, typer.Option("--to", help="Target backbone: number, label or @alias.")],
    side_info: Annotated[str | None, typer.Option(help="Side-info model h also reads (default: none, the "
                                                       "ablation without side-info).")] = None,
    train: Annotated[Path | None, typer.Option(help="Training images, DIR/<class>/<image> or flat, relative to "
                                                    "--root.")] = None,
    val: Annotated[Path | None, typer.Option(help="Validation images (class folders give CMC/mAP), relative to "
                                                  "--root; default: hold out --val-fraction of --train.")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Parquet file of vectors (columns old, new[, side_info, "
                                                    "label]) instead of images, relative to --root.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Held-out validation fraction (--pairs, "
                                                                       "or --train without --val).")] = 0.1,
    label: Annotated[str | None, typer.Option(help="Label of the new version (default: h-<from>-<to>[-noside])."
                                              )] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: transformation.epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: transformation.lr).")] = None,
    hidden_dim: Annotated[int | None, typer.Option(min=1, help="Mixer width (default: transformation.hidden_dim)."
                                                   )] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default: transformation.batch_size)."
                                                   )] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: transformation.seeds[0]).")] = None,
    loss: Annotated[str | None, typer.Option(help="mse (FCT) or fastfill (FastFill: adds the target's classifier "
                                                  "term and an uncertainty output for backfill --order uncertainty; "
                                                  "needs labelled items) (default: transformation.loss).")] = None,
) -> None:
    """Fit h(old[, side-info]) -> new on images or vector pairs, export and validate it, and register it."""
    project: Project = ctx.obj
    registry = project.registry()
    params = usecase.transformation_params(project.root, epochs=epochs, lr=lr, hidden_dim=hidden_dim,
                                           batch_size=batch_size, loss=loss)
    out = console()
    with ExitStack() as stack:
        if out.is_terminal:
            bar = stack.enter_context(progress_bars(out))
            tasks: dict[str, int] = {}

            def on_features(what: str, done: int, total: int, cached: bool) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(f"features {what}", total=total, note="", unit="images")
                bar.update(tasks[what], completed=done, note="cached" if cached else "")

            def on_epoch(epoch: int, epochs_total: int, mse: float) -> None:
                if "train" not in tasks:
                    tasks["train"] = bar.add_task("training h", total=epochs_total, note="", unit="epochs")
                bar.update(tasks["train"], completed=epoch, note=f"train MSE {mse:.4f}")
        else:  # logs: rich draws nothing off a terminal
            # what -> [start, last line]; an extraction starts when the previous one ended (its first call comes
            # after its first batch)
            started: dict[str, list[float]] = {"": [time.monotonic()] * 2}

            def on_features(what: str, done: int, total: int, cached: bool) -> None:
                now = time.monotonic()
                start, logged = started.setdefault(what, [started[""][0], now])
                rate = f"{done / max(now - start, 1e-9):,.1f} images/s"
                if cached or done == total:
                    started[""][0] = now
                    out.print(f"features {what}: {total} images " + ("(cached)" if cached else
                                                                      f"extracted in {now - start:.1f} s, {rate}"),
                              markup=False)
                elif now - logged >= LOG_EVERY_S:
                    started[what][1] = now
                    out.print(f"features {what}: {done}/{total} images, {rate}", markup=False)

            def on_epoch(epoch: int, epochs_total: int, mse: float) -> None:
                out.print(f"epoch {epoch}/{epochs_total}: train MSE {mse:.6f}", markup=False)

        result = usecase.fit_transformation(
            registry, source, target, side_info, train=None if train is None else project.root / train,
            val=None if val is None else project.root / val, pairs=None if pairs is None else project.root / pairs,
            val_fraction=val_fraction, params=params, seed=seed, label=label, on_features=on_features,
            on_epoch=on_epoch)
    version, m = result.version, result.metrics
    ranks = [key for key in m if key.startswith("cmc_top")]
    summary = table(f"validation of {version.ref.label} on {result.n_val} items (trained on {result.n_train})",
                    "comparison", *((*ranks, "map") if result.labelled else ()), "knn_overlap")
    if result.labelled:
        for name, prefix in (("new vs h(old)", ""), ("old vs old", "old_old_"), ("new vs new", "new_new_")):
            cells = [f"{m[prefix + key]:.4f}" for key in ranks] + [f"{m[prefix + 'map']:.4f}"]
            row(summary, name, *cells, f"{m['knn_overlap']:.4f}" if not prefix else "-")
    else:
        row(summary, "new vs h(old)", f"{m['knn_overlap']:.4f}")
    out.print(summary)
    side = f", side-info {version.tags['fct.side_info_label']}" if "fct.side_info_label" in version.tags else ""
    if "classifier_accuracy" in m:
        out.print(f"FastFill loss: W_new is a {usecase.CLASSIFIER_NOTE} (training accuracy "
                  f"{m['classifier_accuracy']:.4f})", markup=False)
    out.print(f"registered {named(version)} ({version.ref}): {version.tags['fct.source_label']} -> "
              f"{version.tags['fct.target_label']}{side}; train MSE {m['train_mse']:.6f}", markup=False)
