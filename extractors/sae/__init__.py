"""SAE codes as an array kind: the stored format, loading SAEs (and the `saes` registry),
extraction of codes on the unit engine, and the catalog tables over them."""
