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
    from sae_core.patch_store import PATCH_STORE, write_patch_store
    from sae_core.patches import PatchConfig, make_patches
    from sae_core.transform import TRANSFORM

    check_paths(inputs={**(inputs or {}), "images": images},
                outputs={"patches": (patches, PATCH_STORE), "transform": (transform, TRANSFORM)})
    config = PatchConfig.from_dict(settings)
    dataset = read_dataset(images)
    train, heldout, fitted = make_patches(dataset.images, config)
    write_patch_store(patches, train, heldout, config.to_dict(), sha256_file(images))
    fitted.save(transform)
    print(f"patches: {train.shape[0]} training and {heldout.shape[0]} held-out patches of "
          f"{train.shape[1]} values -> {patches}; transform -> {transform}")
    return {"n_train": int(train.shape[0]), "n_heldout": int(heldout.shape[0])}


patches_flow = flow(name="patches", log_prints=False, persist_result=False)(patches)
