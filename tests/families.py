"""The architecture families bcosify claims: each gets an equivalence and a completeness test.

The README's support table is generated from this list (``make table``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    family: str
    source: str  # "timm" or "torchvision"
    name: str
    size: int = 32
    kwargs: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.name}"

    @property
    def id(self) -> str:
        return self.spec + (f"[{self.kwargs_text}]" if self.kwargs else "")

    @property
    def kwargs_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())


FAMILIES = [
    Family("ResNet", "timm", "resnet18"),
    Family("ResNet", "timm", "resnet50"),
    Family("ResNet", "torchvision", "resnet18"),
    Family("ResNet", "torchvision", "resnet50"),
    Family("ResNeXt", "timm", "resnext50_32x4d"),
    Family("ResNeXt", "torchvision", "resnext50_32x4d"),
    Family("Wide-ResNet", "timm", "wide_resnet50_2"),
    Family("Wide-ResNet", "torchvision", "wide_resnet50_2"),
    Family("VGG", "timm", "vgg11"),
    Family("VGG", "torchvision", "vgg11"),
    Family("VGG+BN", "timm", "vgg11_bn"),
    Family("VGG+BN", "torchvision", "vgg11_bn"),
    Family("DenseNet", "timm", "densenet121"),
    Family("DenseNet", "torchvision", "densenet121"),
    Family("RegNetX", "timm", "regnetx_002"),
    Family("RegNetX", "torchvision", "regnet_x_400mf"),
    Family("RegNetY (SE)", "timm", "regnety_002"),
    Family("RegNetY (SE)", "torchvision", "regnet_y_400mf"),
    Family("EfficientNet", "timm", "efficientnet_b0"),
    Family("EfficientNet", "torchvision", "efficientnet_b0"),
    Family("EfficientNet (TF 'SAME' padding)", "timm", "tf_efficientnet_b0", size=35),
    Family("EfficientNet-Lite", "timm", "efficientnet_lite0"),
    Family("MobileNetV2", "timm", "mobilenetv2_100"),
    Family("MobileNetV2", "torchvision", "mobilenet_v2"),
    Family("MobileNetV3", "timm", "mobilenetv3_large_100"),
    Family("MobileNetV3", "torchvision", "mobilenet_v3_small"),
    Family("ConvNeXt", "timm", "convnext_atto"),
    Family("ConvNeXt", "torchvision", "convnext_tiny"),
    # vision transformers (small: 32 px, patch 8, 2 blocks)
    Family("ViT (class token)", "timm", "vit_tiny_patch16_224", kwargs=dict(img_size=32, patch_size=8, depth=2)),
    Family("ViT (no class token, 4 register tokens, average pooling)", "timm", "vit_tiny_patch16_224",
           kwargs=dict(img_size=32, patch_size=8, depth=2, class_token=False, reg_tokens=4, global_pool="avg")),
    Family("ViT (class token, layer scale, no pos. embedding on tokens)", "timm", "vit_tiny_patch16_224",
           kwargs=dict(img_size=32, patch_size=8, depth=2, init_values=0.1, no_embed_class=True, reg_tokens=1)),
    Family("DeiT", "timm", "deit_tiny_patch16_224", kwargs=dict(img_size=32, patch_size=8, depth=2)),
    Family("DeiT distilled (class + distillation token)", "timm", "deit_tiny_distilled_patch16_224",
           kwargs=dict(img_size=32, patch_size=8, depth=2)),
    Family("ViT (nn.MultiheadAttention)", "torchvision", "vit_b_16", kwargs=dict(image_size=32)),
    Family("Swin (shifted windows, relative position bias)", "timm", "swin_tiny_patch4_window7_224",
           kwargs=dict(img_size=32, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32)),
]
