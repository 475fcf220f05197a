//! libdmem.so, the LD_PRELOAD shim. Empty until the libdmem issue builds it:
//! preloading it today changes nothing.
