"""Explaining a retrieval
======================

Retrieval ranks a gallery by cosine similarity to a query. For each of the top matches,
a same-class pair explanation shows what in the query and in the match made the model
put them close. :mod:`simexplain.apps.retrieval` has the pieces: :func:`~simexplain.rank_gallery`
(exact cosine ranking in torch), :func:`~simexplain.explain_matches` (pair maps for a
query and its matches) and :func:`~simexplain.plot_retrieval`. For folders of image
files, ``simexplain explain-dir QUERIES --gallery DIR --model ...`` does all of it from
the command line.
"""

# %%

from simexplain import EmbeddingAttribution, explain_matches, rank_gallery
from simexplain.data import SHAPE_CLASSES, make_shapes
from simexplain.demo import embed, trained_demo_model

model, data = trained_demo_model()  # the demo's CNN on generated shapes (cached)
images, labels = data.test_images, data.test_labels

# %%
# A gallery of unseen images (another seed) and two queries.
gallery, gallery_labels = make_shapes(n_per_class=20, num_classes=6, image_size=48, seed=7)
queries, query_labels = make_shapes(n_per_class=1, num_classes=6, image_size=48, seed=11)
queries, query_labels = queries[:2], query_labels[:2]

similarities, indices = rank_gallery(embed(model, queries), embed(model, gallery), top_k=4)
for q in range(len(queries)):
    found = [SHAPE_CLASSES[int(gallery_labels[i])] for i in indices[q]]
    print(f"query {SHAPE_CLASSES[int(query_labels[q])]}: top 4 {found}")

# %%
# One figure per query: the query's map for each match (top row) and each match with its
# own map and cosine similarity.
attribution = EmbeddingAttribution(model)
figures = []
for q in range(len(queries)):
    result = explain_matches(
        attribution,
        queries[q],
        gallery[indices[q]],
        names=[SHAPE_CLASSES[int(gallery_labels[i])] for i in indices[q]],
    )
    figures.append(result.plot(query_title=f"query: {SHAPE_CLASSES[int(query_labels[q])]}"))
