//! Code generation for `#[agent_vm_test]`.
//!
//! The user's function is kept unchanged; next to it goes a `const _: () = { ... };`
//! block holding a runner function and the test's registration in
//! `agentvm_test`'s distributed slice. The generated code only uses absolute
//! `::agentvm_test::__private::...` paths (and `::core` macros), so users need no
//! other dependency and no imports.

use std::path::Path;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Signature, Type};

use crate::args::{parse_args, Errors, TestArgs};

/// Expands `#[agent_vm_test(args)] item`. Never fails: errors become
/// `compile_error!`s, emitted together with the unchanged item so that they
/// are not followed by unrelated "cannot find function" errors.
pub fn expand(args: TokenStream, item: TokenStream, manifest_dir: &Path) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(e) => {
            let e = syn::Error::new(
                e.span(),
                format!("#[agent_vm_test] applies to an `async fn` taking `&mut Vm`: {e}"),
            );
            let mut out = e.to_compile_error();
            out.extend(item);
            return out;
        }
    };
    let mut errors = Errors::default();
    let args = parse_args(args, manifest_dir)
        .map_err(|e| errors.push(e))
        .ok();
    let arg_ty = check_function(&func).map_err(|e| errors.push(e)).ok();
    match (errors.finish(), args, arg_ty) {
        (Ok(()), Some(args), Some(arg_ty)) => generate(&func, &args, arg_ty),
        (result, ..) => {
            let mut out = result
                .err()
                .map(|e| e.to_compile_error())
                .unwrap_or_default();
            func.to_tokens(&mut out);
            out
        }
    }
}

/// Checks that `func` can be a test: `async`, no generics, exactly one
/// `&mut _` argument. Returns the argument's type.
pub fn check_function(func: &ItemFn) -> syn::Result<&Type> {
    let mut errors = Errors::default();
    let sig = &func.sig;
    for attr in &func.attrs {
        let path = attr.path();
        if path.is_ident("test")
            || path.segments.last().is_some_and(|s| s.ident == "test") && path.segments.len() == 2
        {
            errors.push(syn::Error::new_spanned(
                attr,
                "remove this attribute: #[agent_vm_test] registers the test itself",
            ));
        }
    }
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            format!(
                "#[agent_vm_test] functions must be `async`: write `async fn {}(vm: &mut Vm)`",
                sig.ident
            ),
        ));
    }
    if let Some(c) = &sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "#[agent_vm_test] functions cannot be `const`",
        ));
    }
    if let Some(u) = &sig.unsafety {
        errors.push(syn::Error::new(
            u.span,
            "#[agent_vm_test] functions cannot be `unsafe`",
        ));
    }
    if let Some(abi) = &sig.abi {
        errors.push(syn::Error::new_spanned(
            abi,
            "#[agent_vm_test] functions cannot have an `extern` ABI",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        let mut tokens = sig.generics.to_token_stream();
        sig.generics.where_clause.to_tokens(&mut tokens);
        errors.push(syn::Error::new_spanned(
            tokens,
            "#[agent_vm_test] functions cannot have generic parameters or a where clause",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            variadic,
            "#[agent_vm_test] functions cannot be variadic",
        ));
    }
    let arg_ty = check_inputs(sig).map_err(|e| errors.push(e)).ok();
    errors.finish()?;
    Ok(arg_ty.expect("no errors, so the argument was checked"))
}

fn check_inputs(sig: &Signature) -> syn::Result<&Type> {
    const EXPECTED: &str = "exactly one argument, the VM: `vm: &mut Vm`";
    let mut inputs = sig.inputs.iter();
    let Some(first) = inputs.next() else {
        return Err(syn::Error::new(
            sig.paren_token.span.join(),
            format!("#[agent_vm_test] functions take {EXPECTED}"),
        ));
    };
    let extra: TokenStream = sig
        .inputs
        .pairs()
        .skip(1)
        .flat_map(|pair| pair.into_value().to_token_stream())
        .collect();
    if !extra.is_empty() {
        return Err(syn::Error::new_spanned(
            extra,
            format!(
                "#[agent_vm_test] functions take {EXPECTED}; found {} arguments",
                sig.inputs.len()
            ),
        ));
    }
    match first {
        FnArg::Receiver(receiver) => Err(syn::Error::new_spanned(
            receiver,
            format!("#[agent_vm_test] functions cannot take `self`: they take {EXPECTED}"),
        )),
        FnArg::Typed(arg) => match &*arg.ty {
            Type::Reference(r) if r.mutability.is_some() => Ok(&arg.ty),
            other => Err(syn::Error::new_spanned(
                other,
                "the argument of an #[agent_vm_test] function must be a mutable reference \
                 to the VM: `&mut Vm`",
            )),
        },
    }
}

/// The unchanged function followed by its runner and registration.
pub fn generate(func: &ItemFn, args: &TestArgs, arg_ty: &Type) -> TokenStream {
    let name = &func.sig.ident;
    let name_str = name.unraw().to_string();
    let config = config_expr(args);
    // Spanned so that type errors point at the user's argument / return type.
    let call = quote_spanned!(arg_ty.span()=> #name(vm));
    let output_span = match &func.sig.output {
        ReturnType::Default => name.span(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    let outcome = quote_spanned!(output_span=>
        ::agentvm_test::__private::IntoTestOutcome::into_test_outcome(output)
    );
    let line = quote_spanned!(name.span()=> ::core::line!());
    quote! {
        #func

        #[doc(hidden)]
        const _: () = {
            fn __agentvm_test_run<'vm>(
                vm: &'vm mut ::agentvm_test::__private::Vm,
            ) -> ::agentvm_test::__private::TestFuture<'vm> {
                ::agentvm_test::__private::Box::pin(async move {
                    let output = #call.await;
                    #outcome
                })
            }

            #[::agentvm_test::__private::linkme::distributed_slice(::agentvm_test::__private::TESTS)]
            #[linkme(crate = ::agentvm_test::__private::linkme)]
            static __AGENTVM_TEST_CASE: ::agentvm_test::__private::TestCase =
                ::agentvm_test::__private::TestCase {
                    name: #name_str,
                    module_path: ::core::module_path!(),
                    file: ::core::file!(),
                    line: #line,
                    config: #config,
                    run: __agentvm_test_run,
                };
        };
    }
}

/// A `TestConfig` constant expression with the given settings.
pub fn config_expr(args: &TestArgs) -> TokenStream {
    let some = |value: TokenStream| quote!(::agentvm_test::__private::Some(#value));
    let mut fields = Vec::new();
    if let Some(ms) = args.timeout_ms {
        let value = some(quote!(::agentvm_test::__private::Duration::from_millis(#ms)));
        fields.push(quote!(timeout: #value));
    }
    for (field, value) in [
        ("profile", &args.profile),
        ("image", &args.image),
        ("network", &args.network),
    ] {
        if let Some(value) = value {
            let field = syn::Ident::new(field, Span::call_site());
            let value = some(quote!(#value));
            fields.push(quote!(#field: #value));
        }
    }
    for (field, value) in [("memory_mib", args.memory_mib), ("vcpus", args.vcpus)] {
        if let Some(value) = value {
            let field = syn::Ident::new(field, Span::call_site());
            let value = some(quote!(#value));
            fields.push(quote!(#field: #value));
        }
    }
    if let Some(reason) = &args.ignore {
        let reason = match reason {
            Some(reason) => some(quote!(#reason)),
            None => quote!(::agentvm_test::__private::None),
        };
        let value = some(reason);
        fields.push(quote!(ignore: #value));
    }
    if let Some(fixtures) = &args.fixtures {
        fields.push(quote!(fixtures: &[#(#fixtures),*]));
    }
    if let Some(allow) = &args.allow {
        fields.push(quote!(allow: &[#(#allow),*]));
    }
    quote! {
        ::agentvm_test::__private::TestConfig {
            #(#fields,)*
            ..::agentvm_test::__private::TestConfig::DEFAULT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;
    use std::path::PathBuf;

    fn manifest_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn expand_str(args: TokenStream, item: TokenStream) -> String {
        expand(args, item, &manifest_dir()).to_string()
    }

    /// Token-stream text without spaces, for robust `contains` checks.
    fn squash(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    fn check_err(item: TokenStream) -> String {
        let func: ItemFn = syn::parse2(item).unwrap();
        check_function(&func).unwrap_err().to_string()
    }

    #[test]
    fn registers_the_test_and_keeps_the_function() {
        let item = quote! {
            async fn agent_creates_hello(vm: &mut Vm) -> TestResult { Ok(()) }
        };
        let out = expand_str(quote!(timeout = "30s", profile = "light"), item.clone());
        let flat = squash(&out);
        // The function comes first, unchanged.
        assert!(out.starts_with(&item.to_string()), "{out}");
        for expected in [
            "const_:()={",
            "#[::agentvm_test::__private::linkme::distributed_slice(::agentvm_test::__private::TESTS)]",
            "#[linkme(crate=::agentvm_test::__private::linkme)]",
            "static__AGENTVM_TEST_CASE:::agentvm_test::__private::TestCase=",
            "name:\"agent_creates_hello\"",
            "module_path:::core::module_path!()",
            "file:::core::file!()",
            "line:::core::line!()",
            "run:__agentvm_test_run",
            "agent_creates_hello(vm).await",
            "::agentvm_test::__private::IntoTestOutcome::into_test_outcome(output)",
            "timeout:::agentvm_test::__private::Some(::agentvm_test::__private::Duration::from_millis(30000u64))",
            "profile:::agentvm_test::__private::Some(\"light\")",
            "..::agentvm_test::__private::TestConfig::DEFAULT",
        ] {
            assert!(flat.contains(expected), "missing {expected} in {out}");
        }
        assert!(!flat.contains("compile_error"), "{out}");
    }

    /// The first segment of every absolute (`::x::...`) path in `tokens`.
    fn absolute_path_roots(tokens: TokenStream, out: &mut Vec<String>) {
        use proc_macro2::{Spacing, TokenTree};
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, tt) in tokens.iter().enumerate() {
            match tt {
                TokenTree::Group(g) => absolute_path_roots(g.stream(), out),
                TokenTree::Punct(p) if p.as_char() == ':' && p.spacing() == Spacing::Joint => {
                    let continues_a_path = i > 0
                        && match &tokens[i - 1] {
                            TokenTree::Ident(_) => true,
                            TokenTree::Punct(q) => {
                                q.as_char() == '>'
                                    || (q.as_char() == ':' && q.spacing() == Spacing::Joint)
                            }
                            _ => false,
                        };
                    if !continues_a_path {
                        if let Some(TokenTree::Ident(root)) = tokens.get(i + 2) {
                            out.push(root.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn generated_code_uses_only_absolute_agentvm_test_and_core_paths() {
        let out = expand(
            quote!(timeout = "1s", ignore, fixtures("src"), vcpus = 1),
            quote!(
                async fn t(vm: &mut Vm) -> Result<(), String> {
                    Ok(())
                }
            ),
            &manifest_dir(),
        );
        let mut roots = Vec::new();
        absolute_path_roots(out, &mut roots);
        assert!(roots.len() > 10, "{roots:?}");
        assert!(
            roots.iter().all(|r| r == "agentvm_test" || r == "core"),
            "{roots:?}"
        );
    }

    #[test]
    fn config_for_every_argument() {
        let config = squash(
            &config_expr(&TestArgs {
                timeout_ms: Some(1500),
                profile: Some("minimal".into()),
                image: Some("img".into()),
                network: Some("nat-filtered".into()),
                allow: Some(vec!["a.example:443".into()]),
                memory_mib: Some(512),
                vcpus: Some(2),
                ignore: Some(Some("slow".into())),
                fixtures: Some(vec!["/a/b".into(), "/c".into()]),
            })
            .to_string(),
        );
        for expected in [
            "from_millis(1500u64)",
            "profile:::agentvm_test::__private::Some(\"minimal\")",
            "image:::agentvm_test::__private::Some(\"img\")",
            "network:::agentvm_test::__private::Some(\"nat-filtered\")",
            "memory_mib:::agentvm_test::__private::Some(512u32)",
            "vcpus:::agentvm_test::__private::Some(2u32)",
            "ignore:::agentvm_test::__private::Some(::agentvm_test::__private::Some(\"slow\"))",
            "fixtures:&[\"/a/b\",\"/c\"]",
            "allow:&[\"a.example:443\"]",
        ] {
            assert!(config.contains(expected), "missing {expected} in {config}");
        }
        let ignored = squash(
            &config_expr(&TestArgs {
                ignore: Some(None),
                ..TestArgs::default()
            })
            .to_string(),
        );
        assert!(
            ignored.contains(
                "ignore:::agentvm_test::__private::Some(::agentvm_test::__private::None)"
            ),
            "{ignored}"
        );
        let empty = squash(&config_expr(&TestArgs::default()).to_string());
        assert_eq!(
            empty,
            "::agentvm_test::__private::TestConfig{..::agentvm_test::__private::TestConfig::DEFAULT}"
        );
    }

    #[test]
    fn fixtures_are_absolute_in_the_expansion() {
        let out = expand_str(
            quote!(fixtures("src")),
            quote!(
                async fn t(vm: &mut Vm) {}
            ),
        );
        let expected = format!("{:?}", manifest_dir().join("src").to_str().unwrap());
        assert!(out.contains(&expected), "{out}");
    }

    #[test]
    fn raw_identifiers_are_unraw_in_the_name() {
        let out = expand_str(
            quote!(),
            quote!(
                async fn r#match(vm: &mut Vm) {}
            ),
        );
        assert!(squash(&out).contains("name:\"match\""), "{out}");
        assert!(squash(&out).contains("r#match(vm).await"), "{out}");
    }

    #[test]
    fn errors_keep_the_function() {
        let out = expand_str(
            quote!(bogus = 1),
            quote!(
                async fn t(vm: &mut Vm) {}
            ),
        );
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("async fn t"), "{out}");
        assert!(!out.contains("distributed_slice"), "{out}");
        // Argument and signature errors are reported together.
        let out = expand_str(
            quote!(bogus = 1),
            quote!(
                fn t() {}
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
    }

    #[test]
    fn not_a_function() {
        let out = expand_str(
            quote!(),
            quote!(
                struct S;
            ),
        );
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("applies to an `async fn`"), "{out}");
        assert!(out.contains("struct S"), "{out}");
    }

    #[test]
    fn signature_checks() {
        let ok: ItemFn = syn::parse2(quote!(
            async fn t(vm: &mut Vm) -> TestResult {
                Ok(())
            }
        ))
        .unwrap();
        assert!(check_function(&ok).is_ok());
        let ok: ItemFn = syn::parse2(quote!(
            pub(crate) async fn t(_vm: &mut agentvm_test::Vm) {}
        ))
        .unwrap();
        assert!(check_function(&ok).is_ok());

        assert!(check_err(quote!(
            fn t(vm: &mut Vm) {}
        ))
        .contains("must be `async`"));
        assert!(check_err(quote!(
            async fn t() {}
        ))
        .contains("take exactly one argument"));
        let e = check_err(quote!(
            async fn t(vm: &mut Vm, n: u32) {}
        ));
        assert!(e.contains("found 2 arguments"), "{e}");
        assert!(check_err(quote!(
            async fn t(&mut self) {}
        ))
        .contains("cannot take `self`"));
        assert!(check_err(quote!(
            async fn t(vm: Vm) {}
        ))
        .contains("must be a mutable reference"));
        assert!(check_err(quote!(
            async fn t(vm: &Vm) {}
        ))
        .contains("must be a mutable reference"));
        assert!(check_err(quote!(
            async fn t<T>(vm: &mut T) {}
        ))
        .contains("generic parameters"));
        assert!(check_err(quote!(
            async fn t(vm: &mut Vm)
            where
                Vm: Send,
            {
            }
        ))
        .contains("where clause"));
        assert!(check_err(quote!(
            async unsafe fn t(vm: &mut Vm) {}
        ))
        .contains("`unsafe`"));
        assert!(check_err(quote!(
            async extern "C" fn t(vm: &mut Vm) {}
        ))
        .contains("`extern`"));
        assert!(check_err(quote!(
            #[test]
            async fn t(vm: &mut Vm) {}
        ))
        .contains("remove this attribute"));
        assert!(check_err(quote!(
            #[tokio::test]
            async fn t(vm: &mut Vm) {}
        ))
        .contains("remove this attribute"));
        // Several problems at once are all reported.
        let func: ItemFn = syn::parse2(quote!(
            fn t<T>() {}
        ))
        .unwrap();
        assert_eq!(check_function(&func).unwrap_err().into_iter().count(), 3);
    }

    #[test]
    fn signature_errors_point_at_the_problem() {
        fn column(src: &str) -> usize {
            let func: ItemFn = syn::parse_str(src).unwrap();
            check_function(&func).unwrap_err().span().start().column
        }
        assert_eq!(column("fn t(vm: &mut Vm) {}"), 0);
        assert_eq!(column("async fn t(vm: &mut Vm, n: u32) {}"), 24);
        assert_eq!(column("async fn t(vm: Vm) {}"), 15);
        assert_eq!(column("async fn t() {}"), 10);
    }
}
