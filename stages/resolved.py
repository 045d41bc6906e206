"""The resolved settings of each stage: exactly the params its result depends on, as plain JSON-able data.

Written beside a stage's outputs (settings.json), part of the fingerprint of its work in progress, and written by
the `settings` stage into results/settings/ (one file per stage and matrix item), which is what the expensive
stages of dvc.yaml depend on: a stage reruns only when its own resolved settings change. The example-parallel
stages (certify, certify_chain, attack) run one thread per process (stages/common.py), so cpu_threads is not
among their settings.
"""

from __future__ import annotations

from dmae.settings import PER_SIGMA, Params


def _dump(section) -> dict:
    return section.model_dump(mode="json")


def prepare(params: Params) -> dict:
    return {"data": _dump(params.data)}


def pretrain(params: Params, variant: str | None = None) -> dict:
    settings = {"data": _dump(params.data), "model": _dump(params.model), "cpu_threads": params.cpu_threads,
                "pretrain": _dump(params.denoiser_settings(variant) if variant else params.pretrain)}
    return {**settings, "variant": variant} if variant else settings


def finetune(params: Params, sigma: float) -> dict:
    return {"data": _dump(params.data), "model": _dump(params.model), "cpu_threads": params.cpu_threads,
            "finetune": _dump(params.finetune), "sigma": sigma}


def certify(params: Params, sigma: float) -> dict:
    """CERTIFY uses n; adaptive certification (mixture, union) n_max and the report's radii (its brackets)."""
    c = _dump(params.certify)
    if c["method"] == "cohen":
        del c["n_max"]
    else:
        del c["n"]
        c["radii"] = list(params.report.radii)
    return {"data": _dump(params.data), "model": _dump(params.model), "certify": c, "sigma": sigma}


def finetune_defense(params: Params, name: str) -> dict:
    spec = params.defense.classifiers[name]
    return {"data": _dump(params.data), "model": _dump(params.model), "cpu_threads": params.cpu_threads,
            "finetune": _dump(params.defense_finetune()), "classifier": {"name": name, **_dump(spec)},
            "train_sigma_max": params.defense.train_sigma_max,
            "pretrained": {m: _dump(params.denoiser_settings(m)) for m in {spec.encoder, spec.denoiser} - {None}}}


def finetune_chain(params: Params, sigma: float) -> dict:
    spec = params.denoised_smoothing.finetune
    return {"data": _dump(params.data), "model": _dump(params.model), "cpu_threads": params.cpu_threads,
            "finetune": _dump(params.defense_finetune()), "chain_finetune": _dump(spec), "sigma": sigma,
            "pretrained": {m: _dump(params.denoiser_settings(m)) for m in {spec.encoder, spec.denoiser}}}


def certify_chain(params: Params, sigma: float, chain: str) -> dict:
    spec = params.denoised_smoothing.chains[chain]
    return {**certify(params, sigma), "test_every": params.denoised_smoothing.test_every,
            "chain": {"name": chain, **_dump(spec),
                      "norm_pix_loss": params.denoiser_settings(spec.denoiser).norm_pix_loss,
                      "groups": params.denoiser_settings(spec.denoiser).reconstruct_groups}}


def attack(params: Params) -> dict:
    chains = {}
    for name, spec in params.defense.classifiers.items():
        how = params.denoiser_settings(spec.denoiser) if spec.denoiser else None
        chains[name] = {**_dump(spec), "norm_pix_loss": how.norm_pix_loss if how else None,
                        "groups": how.reconstruct_groups if how else None}
    return {"data": _dump(params.data), "model": _dump(params.model), "attack": _dump(params.attack), "chains": chains}


def report(params: Params) -> dict:
    return {"sigmas": sorted(params.sigmas), "dataset": params.data.dataset, "report": _dump(params.report),
            "chains": {name: {**_dump(spec), "fine_tuned": spec.classifier == PER_SIGMA}
                       for name, spec in params.denoised_smoothing.chains.items()},
            "test_every": params.denoised_smoothing.test_every}


def every_stage(params: Params) -> dict[str, dict]:
    """Resolved settings of every stage and matrix item, by the file name the `settings` stage writes."""
    files = {"prepare.json": prepare(params), "pretrain.json": pretrain(params), "attack.json": attack(params),
             "report.json": report(params)}
    for sigma in params.sigmas:
        files[f"finetune-sigma-{float(sigma)}.json"] = finetune(params, sigma)
        files[f"certify-sigma-{float(sigma)}.json"] = certify(params, sigma)
    for name in params.defense.denoisers:
        files[f"denoiser-{name}.json"] = pretrain(params, name)
    for name in params.defense.classifiers:
        files[f"finetune_defense-{name}.json"] = finetune_defense(params, name)
    for sigma in params.sigmas:
        files[f"finetune_chain-sigma-{float(sigma)}.json"] = finetune_chain(params, sigma)
        for chain in params.denoised_smoothing.chains:
            files[f"certify_chain-{chain}-sigma-{float(sigma)}.json"] = certify_chain(params, sigma, chain)
    return files
