"""Multi-step jobs built on the library: the demo, SuTI's apprenticeship, the toy model card."""
