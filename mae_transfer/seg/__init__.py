"""mmsegmentation adapter: MAE encoders as UperNet backbones.

Importing this package registers into mmseg's registries: the `ViTBackbone` backbone, the
`LayerDecayOptimWrapperConstructor`, the `ADE20KLayoutDataset` (any dataset in ADE20K's folder layout), the
`PerClassIoUMetric` and the `WeightsOnlyCheckpointHook`; and into mmengine's file backends the `AtomicLocalBackend`,
so checkpoints are written atomically. Configs bring it in with `custom_imports = dict(imports=['mae_transfer.seg'])`.
"""
from .atomic_backend import AtomicLocalBackend
from .backbone import ViTBackbone, default_out_indices
from .checkpoint_hook import WeightsOnlyCheckpointHook
from .datasets import ADE20KLayoutDataset
from .evaluation import PerClassIoUMetric
from .layer_decay import LayerDecayOptimWrapperConstructor
from .load import load_segmentor
from .relative_position import RelativePositionBias, RelPosBlock, resize_relative_position_table

__all__ = ["ADE20KLayoutDataset", "AtomicLocalBackend", "LayerDecayOptimWrapperConstructor", "PerClassIoUMetric",
           "RelPosBlock", "RelativePositionBias", "ViTBackbone", "WeightsOnlyCheckpointHook", "default_out_indices",
           "load_segmentor", "resize_relative_position_table"]
