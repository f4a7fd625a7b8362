"""Captum: smoothing, robustness and faithfulness
==============================================

:class:`~simexplain.EmbeddingAttribution` is a captum attribution, so captum's tools take
it as it is: ``NoiseTunnel`` averages maps over noisy copies of the tuple,
``sensitivity_max`` measures how much the maps move under small perturbations, and
``infidelity`` checks that the maps predict how the similarity changes when the images
are perturbed. Per-tuple tensors (the pair flags ``target``) are ``(B,)``, so captum
expands them with the inputs.
"""

# %%
import torch
from captum.attr import NoiseTunnel
from captum.metrics import infidelity, infidelity_perturb_func_decorator, sensitivity_max

from simexplain import EmbeddingAttribution, TupleScore, maps_to_input_shape, visualize_map
from simexplain.data import sample_tuples
from simexplain.demo import trained_demo_model
from simexplain.engine import scale_maps, upsample_maps

model, data = trained_demo_model()  # the demo's CNN on generated shapes (cached)
images, labels = data.test_images, data.test_labels
attribution = EmbeddingAttribution(model)

# %%
# Four same-class pairs and four different-class pairs.
generator = torch.Generator().manual_seed(2)
same = sample_tuples(labels, "same_pair", 4, generator)
different = sample_tuples(labels, "different_pair", 4, generator)
pairs = torch.cat([same, different])
x1, x2 = images[pairs[:, 0]], images[pairs[:, 1]]
same_class = torch.tensor([True] * 4 + [False] * 4)

# %%
# SmoothGrad through NoiseTunnel
# ------------------------------
plain = attribution.attribute((x1, x2), target=same_class)
tunnel = NoiseTunnel(attribution)
smooth = tunnel.attribute(
    (x1, x2), nt_type="smoothgrad", nt_samples=8, nt_samples_batch_size=8, stdevs=0.15,
    target=same_class,
)
print("map shapes:", tuple(plain[0].shape), tuple(smooth[0].shape))

# %%
# Robustness and faithfulness, per pair
# -------------------------------------
sensitivity = sensitivity_max(
    attribution.attribute, (x1, x2), target=same_class, n_perturb_samples=4,
    perturb_radius=0.02,
)
score = TupleScore(attribution, (x1, x2), target=same_class)  # w held fixed
maps = maps_to_input_shape(plain, (x1, x2))


@infidelity_perturb_func_decorator(False)
def perturb(inputs):
    return tuple(x - 0.05 * torch.randn_like(x) for x in inputs)


faithfulness = infidelity(score, perturb, (x1, x2), maps, n_perturb_samples=8, normalize=True)
for i in range(len(pairs)):
    kind = "same" if same_class[i] else "different"
    print(f"pair {i} ({kind:9s}): sensitivity {float(sensitivity[i]):.3f}, "
          f"infidelity {float(faithfulness[i]):.2e}")

# %%
# Captum's figures
# ----------------
# :func:`~simexplain.visualize_map` converts a map to the ``(H, W, 1)`` layout of captum's
# ``visualize_image_attr`` (and draws all-zero maps instead of failing).
upsampled = scale_maps(upsample_maps(smooth[0][:1], (48, 48)))[0, 0]
figure, _ = visualize_map(
    upsampled, original_image=x1[0], method="blended_heat_map", alpha_overlay=0.5,
    title="SmoothGrad map of image 1 (same-class pair 0)", use_pyplot=False,
)
