"""The lanit-rt version, in a module of its own: lanit_export reads it without importing the lanit_rt
package, whose Translator calls lanit_export's exporter (export=True)."""

__version__ = "0.1.0"
