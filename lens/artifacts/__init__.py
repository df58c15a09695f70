"""Everything saved or loaded: one metadata record (``metadata``), one reader registry and the
typed loaders (``registry``), the tuned-lens layout and hub (``tuned_lens``), crash-safe writes
(``files``)."""
