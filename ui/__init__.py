"""The Gradio app of adapt (`adapt ui`): base and adapted outputs side by side.  See ui/app.py."""
