"""What people look at: every PNG figure (``plots``) and the self-contained interactive page
(``html``), drawn from the analysis layer's typed results and written atomically."""
