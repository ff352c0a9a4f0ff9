"""infra/k8s: the Kubernetes work pool's job template and the multi-node example parse, and the template, rendered
with Prefect's own templating and its defaults (as a worker renders it for a flow run), asks for GPUs, pins the pod
to GPU nodes and mounts the shared run root. Nothing here talks to a cluster: there is none in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"


def _pod(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def _rendered(values: dict | None = None) -> dict:
    from prefect.utilities.templating import apply_values

    template = yaml.safe_load((K8S / "gpu-job-template.yaml").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **(values or {})})["job_manifest"]


def test_the_job_template_asks_for_gpus_on_gpu_nodes():
    pod = _pod(_rendered())
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/opt/gft/runs"]]["persistentVolumeClaim"]["claimName"] == "gft-runs"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_a_deployment_s_job_variables_reach_the_pod():
    pod = _pod(_rendered({"gpu_limit": 4, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                          "stage_host_label": "paper-7b"}))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert _rendered({"stage_host_label": "paper-7b"})["spec"]["template"]["metadata"]["labels"] == {
        "gft.stage-host": "paper-7b"}


def test_the_multinode_example_follows_the_run_root_on_another_gpu_node():
    service, job = yaml.safe_load_all((K8S / "multinode.yaml").read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"gft.stage-host": "paper-7b"}  # the label the template's variable sets
    assert service["spec"]["ports"][0]["port"] == 29400
    pod = _pod(job)
    (container,) = pod["containers"]
    assert container["command"] == ["gft", "follow", "/opt/gft/runs"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1 and pod["nodeSelector"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["labelSelector"]["matchLabels"] == service["spec"]["selector"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"gft-runs"}  # the same run root as the flow-run pod's default


def test_the_7b_deployment_block_matches_the_template_s_variables():
    """The commented paper-gpu-7b-k8s block of prefect.yaml, uncommented, sets only variables the template has."""
    text = (K8S.parent / "prefect.yaml").read_text()
    block = text[text.index("#  - name: paper-gpu-7b-k8s"):]
    deployment = yaml.safe_load("\n".join(line[1:] for line in block.splitlines()))[0]
    template = yaml.safe_load((K8S / "gpu-job-template.yaml").read_text())
    variables = deployment["work_pool"]["job_variables"]
    assert set(variables) <= set(template["variables"]["properties"]) and variables["gpu_limit"] == 4
