"""Names the whole library shares: the CT label names (the phantoms and the renderer) and the three
anatomical views (the view networks, ACS convolutions, the multi-view recipe, model cards, the pipeline)."""

#: the project's CT label convention: 0 background, 1 liver, 2 liver tumor
CT_LABEL_NAMES = {1: "liver", 2: "liver tumor"}

#: the anatomical views, in this order everywhere (ACS: view n has kernel size 1 along spatial axis n of (D, H, W))
VIEWS = ("axial", "coronal", "sagittal")
