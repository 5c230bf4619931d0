"""How many norm layers convert_model converts in the models of issue 21's
table (timm, torchvision, transformers; random weights from configs, nothing
downloaded): one line per model, the counts from conversion_report.

    python tools/zoo_coverage.py
"""

import sys
import warnings

import torch_bnext


def _torchvision(name):
    def build():
        import torchvision

        return getattr(torchvision.models, name)()

    return build


def _timm(name):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _transformers(config_name, model_name, **kwargs):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**kwargs)
        return getattr(transformers, model_name)(config)

    return build


_SMALL_LM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)

MODELS = {
    "torchvision resnet50": _torchvision("resnet50"),
    "torchvision efficientnet_b0": _torchvision("efficientnet_b0"),
    "torchvision mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "torchvision regnet_y_400mf": _torchvision("regnet_y_400mf"),
    "torchvision swin_t": _torchvision("swin_t"),
    "torchvision vit_b_16": _torchvision("vit_b_16"),
    "torchvision convnext_tiny": _torchvision("convnext_tiny"),
    "timm vit_tiny_patch16_224": _timm("vit_tiny_patch16_224"),
    "timm convnext_atto": _timm("convnext_atto"),
    "timm efficientnet_b0": _timm("efficientnet_b0"),
    "timm regnetx_002": _timm("regnetx_002"),
    "timm tresnet_m": _timm("tresnet_m"),
    "transformers Llama": _transformers("LlamaConfig", "LlamaForCausalLM", **_SMALL_LM),
    "transformers Qwen2": _transformers("Qwen2Config", "Qwen2ForCausalLM", **_SMALL_LM),
    "transformers Mistral": _transformers("MistralConfig", "MistralForCausalLM", **_SMALL_LM),
    "transformers Qwen3": _transformers("Qwen3Config", "Qwen3ForCausalLM", **_SMALL_LM),
    "transformers Gemma": _transformers(
        "GemmaConfig", "GemmaForCausalLM", head_dim=32, **_SMALL_LM
    ),
    "transformers BERT": _transformers(
        "BertConfig", "BertModel", hidden_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    "transformers GPT-2": _transformers(
        "GPT2Config", "GPT2LMHeadModel", n_embd=128, n_layer=2, n_head=4
    ),
}


def main():
    print(f"{'model':34}{'converted':>10}{'left':>6}  classes")
    worst = 0
    for name, build in MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = build()
            except ImportError as e:
                print(f"{name:34}  skipped: {e}")
                continue
        model = torch_bnext.convert_model(model, layernorm=True)
        report = torch_bnext.conversion_report(model)
        converted = sum(n for _, n, _, _ in report)
        left = sum(k for _, _, k, _ in report)
        worst = max(worst, left)
        classes = ", ".join(cls.rsplit(".", 1)[-1] for cls, _, _, _ in report)
        print(f"{name:34}{converted:>10}{left:>6}  {classes}")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
