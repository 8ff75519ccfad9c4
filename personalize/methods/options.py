"""Every method's options: the recipe section named after the method (``lora:``, ``dreambooth:``, ...), with
its own checks (``__post_init__``) and the checks across sections (:meth:`MethodOptions.validate`).

A leaf of the methods package: it imports no model library, so a recipe with a misspelled key or an
impossible value is refused without loading torch. Each class registers itself under its method's name
(:func:`personalize.methods.registry.register_options`); the method classes name theirs as ``config_cls``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from personalize.config import ConfigError, option
from personalize.incontext.names import BLOCK_GROUPS, QUERY_MODES
from personalize.methods.registry import register_options

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class MethodOptions:
    """The base of a method's options."""

    method: ClassVar[str]
    supports_prior_preservation: ClassVar[bool] = False

    @classmethod
    def validate(cls, config) -> None:
        """Checks across sections of the whole :class:`~personalize.config.Config`; raise ConfigError naming the key."""
        if config.prior.enabled and not cls.supports_prior_preservation:
            raise ConfigError(f"prior.enabled: method '{cls.method}' does not use prior preservation")


@register_options
@dataclass
class LoRAConfig(MethodOptions):
    method: ClassVar[str] = "lora"
    supports_prior_preservation: ClassVar[bool] = True

    rank: int = option(4, "LoRA rank r")
    alpha: Optional[float] = option(None, "LoRA alpha (scale = alpha / rank); default: equal to rank")
    dropout: float = option(0.0, "dropout on the LoRA path")
    target_modules: list[str] = option(UNET_ATTENTION, "U-Net module names to adapt (peft target_modules)")
    train_text_encoder: bool = option(False, "also add LoRA to the text encoder(s)")
    text_encoder_rank: Optional[int] = option(None, "text encoder LoRA rank (default: rank)")
    text_encoder_target_modules: list[str] = option(TEXT_ATTENTION, "text encoder module names to adapt")
    text_encoder_learning_rate: Optional[float] = option(None, "text encoder LR (default: train.learning_rate)")
    export_kohya: bool = option(False, "also write pytorch_lora_weights_kohya.safetensors (A1111 / ComfyUI)")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank: must be > 0, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.text_encoder_rank is not None and self.text_encoder_rank <= 0:
            raise ConfigError(f"lora.text_encoder_rank: must be > 0, got {self.text_encoder_rank}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one module")


@register_options
@dataclass
class DreamBoothConfig(MethodOptions):
    method: ClassVar[str] = "dreambooth"
    supports_prior_preservation: ClassVar[bool] = True

    train_text_encoder: bool = option(False, "also fine-tune the text encoder(s)")
    text_encoder_learning_rate: Optional[float] = option(None, "text encoder LR (default: train.learning_rate)")
    identifier_token: Optional[str] = option(None, "pivotal tuning: the rare word of data.instance_prompt that names "
                                                   "the subject (e.g. sks); its input embedding trains with the U-Net "
                                                   "while the rest of the text encoder stays frozen. null: off")
    identifier_learning_rate: Optional[float] = option(None, "LR of the identifier's embedding "
                                                             "(default: train.learning_rate)")
    export_single_file: bool = option(False, "also write model.safetensors in the original SD layout (A1111/ComfyUI)")

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        token = config.method_config.identifier_token
        if token is None:
            if config.method_config.identifier_learning_rate is not None:
                raise ConfigError("dreambooth.identifier_learning_rate: set only with dreambooth.identifier_token")
            return
        if not token.strip() or " " in token:
            raise ConfigError(f"dreambooth.identifier_token: must be one word without spaces, got {token!r}")
        if config.method_config.train_text_encoder:
            raise ConfigError("dreambooth.identifier_token: the whole text encoder already trains with "
                              "dreambooth.train_text_encoder=true; set one of the two")
        prompt = config.data.instance_prompt
        if prompt is not None and token not in prompt.split():
            raise ConfigError(f"data.instance_prompt: {prompt!r} does not contain dreambooth.identifier_token {token!r}")
        class_prompt = config.prior.class_prompt
        if config.prior.enabled and class_prompt and token in class_prompt.split():
            raise ConfigError(f"prior.class_prompt: {class_prompt!r} contains dreambooth.identifier_token {token!r}; "
                              "the class prompt must not name the subject")


@register_options
@dataclass
class TextualInversionConfig(MethodOptions):
    method: ClassVar[str] = "textual_inversion"

    placeholder_token: str = option("<sks>", "the new token that names the subject in prompts")
    initializer_token: str = option("object", "a single existing token whose embedding starts the new one(s)")
    num_vectors: int = option(1, "embedding vectors behind the placeholder (more = more capacity)")

    def __post_init__(self) -> None:
        if self.num_vectors < 1:
            raise ConfigError(f"textual_inversion.num_vectors: must be >= 1, got {self.num_vectors}")
        if not self.placeholder_token.strip() or " " in self.placeholder_token:
            raise ConfigError("textual_inversion.placeholder_token: must be one word without spaces")

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        token, prompt = config.method_config.placeholder_token, config.data.instance_prompt
        if prompt is not None and token not in prompt:
            raise ConfigError(f"data.instance_prompt: {prompt!r} does not contain the placeholder token {token!r}")


@register_options
@dataclass
class Text2ImageConfig(MethodOptions):
    method: ClassVar[str] = "text2image"

    train_text_encoder: bool = option(False, "also train the text encoder(s)")
    text_encoder_learning_rate: float | None = option(None, "text encoder LR (default: train.learning_rate)")
    from_scratch: bool = option(False, "re-initialize the U-Net (and text encoder, if trained) before training")
    export_single_file: bool = option(False, "also write model.safetensors in the original SD layout")

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if config.data.instance_images is None and config.data.metadata is None:
            raise ConfigError("data: text2image needs data.metadata (JSONL) or data.instance_images with captions")


@register_options
@dataclass
class InContextConfig(MethodOptions):
    method: ClassVar[str] = "incontext"

    manifest: Optional[str] = option(None, "JSONL of cluster records {cluster, file_name, text[, context]}")
    num_references: int = option(3, "K: examples shown with each target")
    blocks: list[str] = option(["up"], "U-Net block groups that get reference attention: down, mid, up")
    reference_timestep: int = option(0, "timestep at which the reference encoder sees the clean example latents")
    reference_query: str = option("shared", "shared: reference attention uses the cross-attention's query; self: "
                                            "a query of its own over layer-normed features, the query, key and "
                                            "value starting from the block's self-attention")
    text_dropout: float = option(0.1, "probability of training a sample without its prompt (text guidance)")
    reference_dropout: float = option(0.1, "probability of training a sample without references (reference guidance)")
    lora_rank: int = option(0, "0: base frozen, only the new layers train; > 0: also LoRA of this rank on the U-Net")
    lora_learning_rate: Optional[float] = option(None, "LoRA learning rate (default: train.learning_rate)")
    lora_target_modules: list[str] = option(UNET_ATTENTION, "U-Net module names that get LoRA (peft target_modules; "
                                                            "e.g. also ff.net.0.proj, ff.net.2, proj_in, proj_out, "
                                                            "conv1, conv2)")
    toyworld_subjects: int = option(0, "render this many toy-world training subjects as clusters into the "
                                       "manifest's folder if the manifest is missing")
    toyworld_per_subject: int = option(6, "renders per toy-world subject (distinct contexts)")
    toyworld_seed: int = option(0, "seed of the rendered toy-world clusters")
    init_from: Optional[str] = option(None, "start the new layers (and LoRA) from this in-context model folder, "
                                            "e.g. to train the shipped toy one further; this section may add "
                                            "block groups and LoRA target modules, not remove them, raise its "
                                            "K (examples per target), not lower it, and keep its LoRA rank")

    def __post_init__(self) -> None:
        if self.num_references < 1:
            raise ConfigError(f"incontext.num_references: must be >= 1, got {self.num_references}")
        bad = [b for b in self.blocks if b not in BLOCK_GROUPS]
        if bad or not self.blocks:
            raise ConfigError(f"incontext.blocks: {self.blocks}; choose from {', '.join(BLOCK_GROUPS)}")
        if self.reference_query not in QUERY_MODES:
            raise ConfigError(f"incontext.reference_query: {self.reference_query!r}; choose from {', '.join(QUERY_MODES)}")
        for key in ("text_dropout", "reference_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"incontext.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.lora_rank < 0:
            raise ConfigError(f"incontext.lora_rank: must be >= 0, got {self.lora_rank}")
        if not self.lora_target_modules:
            raise ConfigError("incontext.lora_target_modules: empty; name the U-Net modules that get LoRA")

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if not config.method_config.manifest:
            raise ConfigError("incontext.manifest: the in-context method trains on a cluster manifest (JSONL); "
                              "make one with data_tools/build_clusters.py or data_tools/toy_clusters.py")
        if config.validation.prompts:
            raise ConfigError("validation.prompts: in-context validation needs reference images; set "
                              "validation.prompts=[] and use personalize zero-shot on the output")


@register_options
@dataclass
class AutoencoderConfig(MethodOptions):
    method: ClassVar[str] = "autoencoder"

    kl_weight: float = option(1e-6, "weight of the KL term (per latent element)")
    mse_weight: float = option(1.0, "weight of the pixel MSE term (L1 always has weight 1)")
    gradient_weight: float = option(0.5, "weight of the L1 loss on image gradients (edge sharpness)")
    scaling_images: int = option(512, "training images encoded at export to set vae.config.scaling_factor")
    train_encoder: bool = option(True, "false: fine-tune the decoder only (as SD's ft-MSE VAE was), so the latent "
                                       "space, its scaling_factor and any U-Net trained on it stay valid")

    def __post_init__(self) -> None:
        for key in ("kl_weight", "mse_weight", "gradient_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"autoencoder.{key}: must be >= 0")

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if config.data.cache:
            raise ConfigError("data.cache: the autoencoder method trains the VAE, so latents cannot be cached")
        if config.validation.prompts:
            raise ConfigError("validation.prompts: the autoencoder method has no text-to-image validation; "
                              "set validation.prompts=[]")
