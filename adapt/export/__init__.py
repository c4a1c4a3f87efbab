"""Adapter file formats: export to diffusers/PEFT and kohya/A1111/ComfyUI conventions, import from any of them, merge.

    from adapt.export import load_lora_file
    adapters, metadata = load_lora_file("someone_elses_lora.safetensors", pipe)
"""
from adapt.export.convention import AdapterFileError, ModuleAdapter  # noqa: F401
from adapt.export.files import load_lora_file  # noqa: F401
