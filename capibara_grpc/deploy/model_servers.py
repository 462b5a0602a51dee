"""A model's Deployment and Service: llama-server on the model's GGUF, or vLLM on a GPU node."""

from __future__ import annotations

import pathlib

from capibara_grpc.config import ModelConfig
from capibara_grpc.deploy.objects import LLAMA_IMAGE, MODEL_PORT, VLLM_IMAGE, meta, selector
from capibara_grpc.supervision.launch_commands import REASONING_FLAGS


def model_deployment(model: ModelConfig, gpu: bool) -> list[dict]:
    name = f"model-{model.model_id}"
    if gpu:
        container = {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "args": [
                "--model",
                model.backend.model_name or model.model_id,
                "--served-model-name",
                model.backend.model_name or model.model_id,
                "--host",
                "0.0.0.0",
                "--port",
                str(MODEL_PORT),
            ],
            "resources": {
                "requests": {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            },
        }
    else:
        launch = model.launch
        container = {
            "name": "llama-server",
            "image": LLAMA_IMAGE,
            "args": [
                "--model",
                f"/models/{pathlib.Path(launch.model_path).name if launch.model_path != 'smollm2' else 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
                "--alias",
                model.model_id,
                "--host",
                "0.0.0.0",
                "--port",
                str(MODEL_PORT),
                "--parallel",
                str(launch.parallel),
                "--ctx-size",
                str(launch.ctx_size),
                "--threads",
                str(max(1, launch.threads)),
                *(item for pair in REASONING_FLAGS.items() for item in pair),
                "--jinja",
                "--no-webui",
                # The template that shows the model its tools lies beside the GGUF on the models volume.
                *(
                    ["--chat-template-file", f"/models/{pathlib.Path(launch.chat_template_file).name}"]
                    if launch.chat_template_file
                    else []
                ),
            ],
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        }
    probe = {"httpGet": {"path": "/health", "port": MODEL_PORT}, "periodSeconds": 5}
    container.update(
        {
            "ports": [{"name": "http", "containerPort": MODEL_PORT}],
            "readinessProbe": probe,
            "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6},
        }
    )
    volumes = [] if gpu else [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(name, "model"),
            "spec": {
                "replicas": 1 + len(model.backend.replicas),
                "selector": {"matchLabels": selector(name)},
                "template": {
                    "metadata": {"labels": meta(name, "model")["labels"]},
                    "spec": {"containers": [container], "volumes": volumes},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(name, "model"),
            "spec": {
                "selector": selector(name),
                "ports": [{"name": "http", "port": MODEL_PORT, "targetPort": "http"}],
            },
        },
    ]
