"""Build hook: install ``peft-roselora-autoload.pth`` into site-packages (wheel and editable installs).

Everything else lives in pyproject.toml. The ``.pth`` file makes interpreters import ``_peft_roselora_autoload``,
which registers RoseLoRA with PEFT when ``peft`` is imported (see that module; ``PEFT_ROSELORA_AUTOLOAD=0`` turns it
off). setuptools has no declarative way to place a file at the root of site-packages, hence this ``build_py``.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


AUTOLOAD_PTH = "peft-roselora-autoload.pth"


class BuildPyWithAutoload(build_py):
    def run(self) -> None:
        super().run()
        # a regular build puts it beside the packages; an editable build (PEP 660) writes it into the wheel's root,
        # which setuptools' editable_wheel exposes as the install command's install_lib
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(AUTOLOAD_PTH, os.path.join(target, AUTOLOAD_PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, AUTOLOAD_PTH)]


setup(cmdclass={"build_py": BuildPyWithAutoload})
