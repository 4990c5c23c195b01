//! RSA keys of 1024 to 2047 bits, signed through AWS-LC's own `RSA_sign`.
//!
//! Owns: parsing such a key (PKCS#8 or PKCS#1 DER), checking it, RSASSA-PKCS1-v1_5 over a
//! SHA-256 digest, and the PKCS#1 public key. Must never: take a key of 2048 bits or more
//! (aws-lc-rs signs those: sluice's `dkim::key`), or hand a raw pointer out of this crate.
//!
//! Why it exists: RFC 8301 §3.2 lets signers use 1024-bit keys and many domains still
//! publish them, but aws-lc-rs (like ring) refuses keys under 2048 bits. The pure-Rust `rsa`
//! crate is not constant-time (the Marvin timing attack), so the same AWS-LC code signs here,
//! with its blinding and constant-time exponentiation, through the C API. It is a crate of its
//! own so that sluice's pure `dkim` module stays free of `unsafe`: each block here is an FFI
//! call on a pointer this crate owns.
#![allow(unsafe_code)]

use std::ptr::NonNull;

use aws_lc_sys as sys;

/// The sizes this file signs with (RFC 8301 §3.2's floor up to aws-lc-rs's).
pub const BITS: std::ops::Range<usize> = 1024..2048;

/// An RSA private key of [`BITS`] bits.
pub struct SmallRsa {
    rsa: NonNull<sys::RSA>,
    bits: usize,
}

// SAFETY: an AWS-LC `RSA` is safe to use from several threads once built: `RSA_sign` takes
// the key's internal lock for its lazily made blinding and Montgomery state (BoringSSL's
// rsa.h, "thread safety"), and this type never changes the key after `parse`.
unsafe impl Send for SmallRsa {}
// SAFETY: as above; `&SmallRsa` only signs and reads the public key.
unsafe impl Sync for SmallRsa {}

/// Why a DER key was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmallRsaError {
    /// Not an RSA private key AWS-LC parses, or one whose values do not agree.
    Invalid,
    /// An RSA key outside [`BITS`].
    Size(usize),
}

/// AWS-LC could not sign (it does not happen with a key that parsed and checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignError;

impl SmallRsa {
    /// Parses a PKCS#8 (`pkcs8` true) or PKCS#1 RSA private key and checks its values
    /// (`RSA_check_key`: p·q = n, d·e ≡ 1, the CRT values).
    pub fn parse(der: &[u8], pkcs8: bool) -> Result<SmallRsa, SmallRsaError> {
        let rsa = if pkcs8 { from_pkcs8(der) } else { from_pkcs1(der) };
        let rsa = NonNull::new(rsa).ok_or(SmallRsaError::Invalid)?;
        // Owned from here: dropped (freed) on every return below.
        let mut key = SmallRsa { rsa, bits: 0 };
        // SAFETY: `rsa` is a valid RSA this value owns.
        key.bits = unsafe { sys::RSA_bits(key.rsa.as_ptr()) } as usize;
        if !BITS.contains(&key.bits) {
            return Err(SmallRsaError::Size(key.bits));
        }
        // SAFETY: as above.
        if unsafe { sys::RSA_check_key(key.rsa.as_ptr()) } != 1 {
            clear_errors();
            return Err(SmallRsaError::Invalid);
        }
        Ok(key)
    }

    /// The signature length: the modulus length in bytes.
    pub fn signature_len(&self) -> usize {
        self.bits.div_ceil(8)
    }

    /// RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) with SHA-256 over `data`, appended to `sig`.
    pub fn sign(&self, data: &[u8], sig: &mut Vec<u8>) -> Result<(), SignError> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
        let digest = digest.as_ref();
        let start = sig.len();
        sig.resize(start + self.signature_len(), 0);
        let mut written: std::os::raw::c_uint = 0;
        // SAFETY: `out` has room for RSA_size(rsa) = self.signature_len() bytes, `digest` is 32 valid
        // bytes, and the key is a valid RSA owned by `self`.
        let ok = unsafe {
            sys::RSA_sign(
                sys::NID_sha256,
                digest.as_ptr(),
                digest.len(),
                sig[start..].as_mut_ptr(),
                &mut written,
                self.rsa.as_ptr(),
            )
        };
        if ok != 1 || written as usize != self.signature_len() {
            clear_errors();
            sig.truncate(start);
            return Err(SignError);
        }
        Ok(())
    }

    /// The PKCS#1 RSAPublicKey DER (RFC 8017 §A.1.1).
    pub fn public_pkcs1(&self) -> Vec<u8> {
        let mut out: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: AWS-LC allocates `out` (freed below with OPENSSL_free) and writes its length.
        let ok = unsafe { sys::RSA_public_key_to_bytes(&mut out, &mut len, self.rsa.as_ptr()) };
        if ok != 1 || out.is_null() {
            clear_errors();
            return Vec::new();
        }
        // SAFETY: AWS-LC wrote `len` bytes at `out`.
        let v = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
        // SAFETY: `out` came from AWS-LC's allocator and is not used after this.
        unsafe { sys::OPENSSL_free(out.cast()) };
        v
    }
}

impl Drop for SmallRsa {
    fn drop(&mut self) {
        // SAFETY: the key is owned by this value alone and not used after drop.
        unsafe { sys::RSA_free(self.rsa.as_ptr()) };
    }
}

/// A PKCS#8 PrivateKeyInfo holding an RSA key; null when it is not one.
fn from_pkcs8(der: &[u8]) -> *mut sys::RSA {
    let Ok(len) = std::os::raw::c_long::try_from(der.len()) else { return std::ptr::null_mut() };
    let mut p = der.as_ptr();
    // SAFETY: `p` points at `len` readable bytes; AWS-LC only reads them and advances `p`.
    let pkey = unsafe { sys::d2i_AutoPrivateKey(std::ptr::null_mut(), &mut p, len) };
    if pkey.is_null() {
        clear_errors();
        return std::ptr::null_mut();
    }
    // SAFETY: `pkey` is a valid EVP_PKEY owned here; get1 takes its own reference to the
    // RSA (null for another key type), and the EVP_PKEY is freed after.
    let rsa = unsafe {
        let rsa = if sys::EVP_PKEY_id(pkey) == sys::EVP_PKEY_RSA {
            sys::EVP_PKEY_get1_RSA(pkey)
        } else {
            std::ptr::null_mut()
        };
        sys::EVP_PKEY_free(pkey);
        rsa
    };
    clear_errors();
    rsa
}

/// A PKCS#1 RSAPrivateKey; null when it does not parse.
fn from_pkcs1(der: &[u8]) -> *mut sys::RSA {
    // SAFETY: `der` is valid for its length; AWS-LC only reads it.
    let rsa = unsafe { sys::RSA_private_key_from_bytes(der.as_ptr(), der.len()) };
    if rsa.is_null() {
        clear_errors();
    }
    rsa
}

/// Drops what AWS-LC queued on this thread's error stack (it grows otherwise).
fn clear_errors() {
    // SAFETY: no arguments; clears the calling thread's error queue.
    unsafe { sys::ERR_clear_error() };
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY as ALG};

    /// A PKCS#1 DER key of `bits` bits, made by AWS-LC's own generator.
    fn key_der(bits: i32) -> Vec<u8> {
        // SAFETY: the test's own FFI: generate, marshal, free; every pointer is checked.
        unsafe {
            let rsa = sys::RSA_new();
            let e = sys::BN_new();
            assert!(!rsa.is_null() && !e.is_null());
            assert_eq!(sys::BN_set_word(e, 65537), 1);
            assert_eq!(sys::RSA_generate_key_ex(rsa, bits, e, std::ptr::null_mut()), 1);
            let mut out: *mut u8 = std::ptr::null_mut();
            let mut len = 0usize;
            assert_eq!(sys::RSA_private_key_to_bytes(&mut out, &mut len, rsa), 1);
            let der = std::slice::from_raw_parts(out, len).to_vec();
            sys::OPENSSL_free(out.cast());
            sys::BN_free(e);
            sys::RSA_free(rsa);
            der
        }
    }

    #[test]
    fn signs_pkcs1_v1_5_sha256_that_a_verifier_takes() {
        for bits in [1024, 1536, 1920] {
            let key = SmallRsa::parse(&key_der(bits), false).unwrap();
            assert_eq!(key.signature_len(), (bits as usize).div_ceil(8));
            let mut sig = b"ab".to_vec();
            key.sign(b"the data", &mut sig).unwrap();
            assert_eq!(sig.len(), 2 + key.signature_len());
            let public = UnparsedPublicKey::new(&ALG, key.public_pkcs1());
            public.verify(b"the data", &sig[2..]).unwrap();
            assert!(public.verify(b"the dat4", &sig[2..]).is_err());
        }
    }

    #[test]
    fn sizes_outside_the_range_and_junk_are_refused() {
        assert_eq!(SmallRsa::parse(&key_der(512), false).err(), Some(SmallRsaError::Size(512)));
        assert_eq!(SmallRsa::parse(&key_der(2048), false).err(), Some(SmallRsaError::Size(2048)));
        assert_eq!(SmallRsa::parse(b"junk", false).err(), Some(SmallRsaError::Invalid));
        assert_eq!(SmallRsa::parse(b"junk", true).err(), Some(SmallRsaError::Invalid));
    }
}
