"""Stage 1, ingest: params.yaml ``ingest`` -> the image dataset (feature learning) and the
labeled dataset (downstream scoring), each a Parquet file with a JSON manifest."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.stage_support import compute_timer, read_section

KEYS = {"sources", "labeled_sources"}


def ingest(images: str, images_manifest: str, labeled: str | None = None,
           labeled_manifest: str | None = None, params_file: str = "params.yaml",
           data_dir: str = "data") -> dict:
    """Read ``ingest.sources`` (and ``ingest.labeled_sources``) and write the datasets.
    Everything is read and checked before anything is written."""
    from sae_core.dataset import DATASET, MANIFEST, write_dataset
    from sae_core.outputs import check_paths
    from sae_core.sources import ingest as read_sources
    from sae_core.sources import local_paths

    with compute_timer("ingest") as timer:
        _, cfg = read_section(params_file, "ingest", KEYS)
        root = Path(params_file).resolve().parent
        sources = {**local_paths(cfg.get("sources") or [], root),
                   **local_paths(cfg.get("labeled_sources") or [], root,
                                 "ingest.labeled_sources")}
        check_paths(inputs={"params": params_file, **sources},
                    outputs={"images": (images, DATASET), "images_manifest": (images_manifest,
                                                                              MANIFEST),
                             "labeled": (labeled, DATASET),
                             "labeled_manifest": (labeled_manifest, MANIFEST)})
        sets = {"images": read_sources(cfg.get("sources") or [], root=root,
                                       data_dir=root / data_dir)}
        if labeled is not None:
            if not cfg.get("labeled_sources"):
                raise ValueError(f"{params_file}: ingest.labeled_sources is empty; the score "
                                 "stage needs labeled images")
            sets["labeled"] = read_sources(cfg["labeled_sources"], root=root,
                                           data_dir=root / data_dir)
            if sets["labeled"].labels is None:
                raise ValueError(f"{params_file}: ingest.labeled_sources have no labels")
        summary = {}
        for name, out, manifest in (("images", images, images_manifest),
                                    ("labeled", labeled, labeled_manifest)):
            if name not in sets:
                continue
            m = write_dataset(out, manifest, sets[name])
            shapes = ", ".join(f"{k} x{v}" for k, v in sorted(m.get("shapes", {}).items()))
            print(f"ingest: {len(sets[name])} {name} ({shapes}) -> {out}")
            if sets[name].skipped:
                print(f"ingest: skipped {len(sets[name].skipped)} non-image file(s); "
                      f"listed in {manifest}")
            summary[name] = len(sets[name])
    return {**summary, "seconds": timer["seconds"]}


ingest_flow = flow(name="ingest", log_prints=False, persist_result=False)(ingest)
