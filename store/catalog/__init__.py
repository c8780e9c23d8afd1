"""Catalog tables with code of their own, above the store core:
run records (`runs`), tokenizations and their layout (`tokens`), named row sets (`subsets`)."""
