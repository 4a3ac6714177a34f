"""Export a trained run: fold mergeable adapters into the base weights and save a plain model folder."""

from tuneforge.export.merge import MergeCheckError, MergeReport, merge_adapter, merge_run, verify_merge

__all__ = ["MergeCheckError", "MergeReport", "merge_adapter", "merge_run", "verify_merge"]
