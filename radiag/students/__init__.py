"""Students distilled from teacher rationales: text LMs and MRI+text models (Module II-2)."""
