"""Label names the library's own data use: one small module that the phantoms and the renderer share."""

#: the project's CT label convention: 0 background, 1 liver, 2 liver tumor
CT_LABEL_NAMES = {1: "liver", 2: "liver tumor"}
