"""Stage 2, patches: the image dataset + params.yaml ``patches`` -> the patch store
(train + held-out split, Arrow IPC) and the fitted patch transform."""

from __future__ import annotations

from prefect import flow

from flows.stage_support import compute_timer, read_section


def patches(images: str, patches: str, transform: str,
            params_file: str = "params.yaml") -> dict:
    """Cut, whiten and normalise patches; a bad setting or image writes nothing."""
    with compute_timer("patches") as timer:
        _, cfg = read_section(params_file, "patches")
        result = make_patch_store(images, patches, transform, cfg,
                                  inputs={"params": params_file})
    return {**result, "seconds": timer["seconds"]}


def make_patch_store(images: str, patches: str, transform: str, settings: dict,
                     inputs: dict[str, str] | None = None) -> dict:
    """The patch store (train + held-out split) and its fitted transform from the image
    dataset, with these ``patches`` settings (the stage's, or a sweep point's)."""
    from sae_core.dataset import read_dataset
    from sae_core.io import sha256_file
    from sae_core.outputs import check_paths
    from sae_core.patch_store import PATCH_STORE
    from sae_core.patches import PatchConfig, write_patches
    from sae_core.transform import TRANSFORM

    check_paths(inputs={**(inputs or {}), "images": images},
                outputs={"patches": (patches, PATCH_STORE), "transform": (transform, TRANSFORM)})
    config = PatchConfig.from_dict(settings)
    dataset = read_dataset(images)
    n_train, n_heldout, fitted = write_patches(dataset.images, config, patches,
                                               sha256_file(images))
    fitted.save(transform)
    print(f"patches: {n_train} training and {n_heldout} held-out patches of "
          f"{fitted.n_features} values -> {patches}; transform -> {transform}")
    return {"n_train": n_train, "n_heldout": n_heldout}


patches_flow = flow(name="patches", log_prints=False, persist_result=False)(patches)
